"""A client stream's messages, received on a thread and taken in bounded batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.stream_inbox import StreamInbox


@settings(deadline=None, max_examples=30)
@given(
    messages=st.lists(st.lists(st.integers(), max_size=7), max_size=40),
    batch=st.integers(1, 9),
    limit=st.integers(1, 20),
)
def test_every_item_comes_out_once_in_order_in_batches_of_at_most_batch(
    messages: list[list[int]], batch: int, limit: int
) -> None:
    inbox: StreamInbox[int] = StreamInbox(batch=batch, limit=limit, gather_s=0.0005)
    inbox.start(iter(messages), "test-reader")

    batches = list(inbox.batches())

    assert [item for b in batches for item in b] == [item for m in messages for item in m]
    assert all(0 < len(b) <= batch for b in batches)


def test_the_reader_stops_receiving_while_limit_items_wait() -> None:
    # Given a client that would send as fast as it can
    received = 0

    def client() -> Iterator[list[int]]:
        nonlocal received
        for i in range(1000):
            received += 1
            yield [i]

    inbox: StreamInbox[int] = StreamInbox(batch=4, limit=10, gather_s=0.0)
    inbox.start(client(), "test-reader")
    batches = inbox.batches()

    # When nobody takes from the inbox for a while
    deadline = time.monotonic() + 10
    while received < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)

    # Then the reader holds at most `limit` items (plus the message it was handing in)
    assert 10 <= received <= 11
    # And once taken from, it goes on to the end
    assert sum(len(b) for b in batches) == 1000


def test_an_error_while_receiving_ends_the_batches_with_it() -> None:
    def client() -> Iterator[list[int]]:
        yield [1, 2]
        raise ConnectionResetError("the client went away")

    inbox: StreamInbox[int] = StreamInbox(batch=100, limit=100, gather_s=0.05)
    inbox.start(client(), "test-reader")

    with pytest.raises(ConnectionResetError, match="went away"):
        list(inbox.batches())


def test_a_partial_batch_is_taken_after_the_gather_time_without_more_messages() -> None:
    # Given a client that sends one item, then nothing until told to finish
    finish = threading.Event()

    def client() -> Iterator[list[int]]:
        yield [7]
        finish.wait(10)

    inbox: StreamInbox[int] = StreamInbox(batch=1000, limit=1000, gather_s=0.01)
    inbox.start(client(), "test-reader")
    batches = inbox.batches()

    # Then the item comes out on its own, while the stream is still open
    assert next(batches) == [7]
    finish.set()
    assert list(batches) == []
