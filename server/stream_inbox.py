"""A client stream's messages, read on a thread of their own and taken in batches.

A feedback stream's RPC thread must not block on gRPC's ``next()`` while labels wait to
be committed, so a reader thread receives the messages. Handing them over one by one
(``queue.Queue``) woke the RPC thread once per message whenever it was idle, and with
one label a message those wake-ups and GIL hand-offs cost more than the labels did. Here
the reader appends under a lock and wakes the taker only when the inbox stops being
empty or holds a full batch; the taker, once woken, lets a batch gather for up to
``gather_s`` before it takes everything there is.

Flow control: the reader stops receiving while ``limit`` items wait, so gRPC's window
fills and a fast client's sends block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class StreamInbox(Generic[T]):
    """Items from an iterable of lists (one list a message), filled by ``start``'s thread."""

    def __init__(self, *, batch: int, limit: int, gather_s: float):
        self.batch = batch
        self.limit = max(limit, batch)
        self.gather_s = gather_s
        self._cv = threading.Condition()
        self._items: list[T] = []
        self._done = False
        self._error: BaseException | None = None

    def start(self, messages: Iterable[list[T]], name: str) -> None:
        """Receive ``messages`` on a daemon thread until they end or raise."""
        threading.Thread(target=self._fill, args=(messages,), name=name, daemon=True).start()

    def batches(self) -> Iterator[list[T]]:
        """Lists of at most ``batch`` items, in arrival order, until the messages end.

        Raises:
            Exception: what receiving raised (the client went away); items received
                after the last batch taken are dropped with it.
        """
        while True:
            with self._cv:
                while not self._items and not self._done and self._error is None:
                    self._cv.wait()
                # Something arrived: let a batch gather, unless it is full or the end came.
                deadline = time.monotonic() + self.gather_s
                while len(self._items) < self.batch and not self._done and self._error is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._error is not None:
                    raise self._error
                taken, self._items = self._items[: self.batch], self._items[self.batch :]
                finished = self._done and not self._items
                self._cv.notify_all()  # room for the reader
            if taken:
                yield taken
            if finished:
                return

    def _fill(self, messages: Iterable[list[T]]) -> None:
        try:
            for message in messages:
                with self._cv:
                    while len(self._items) >= self.limit:
                        self._cv.wait()
                    was_empty = not self._items
                    self._items.extend(message)
                    if was_empty or len(self._items) >= self.batch:
                        self._cv.notify_all()
        except Exception as exc:  # the client went away: end the stream
            with self._cv:
                self._error = exc
                self._cv.notify_all()
            return
        with self._cv:
            self._done = True
            self._cv.notify_all()
