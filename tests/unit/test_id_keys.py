"""Prediction ids as byte arrays, and the index the bulk replay finds examples by."""

from __future__ import annotations

from uuid import UUID

import numpy as np
import orjson
from hypothesis import given
from hypothesis import strategies as st

from projections.id_keys import IdIndex, IdSet, ids_from_bytes, ids_from_json_items, ids_from_text

uuids = st.uuids()


@given(st.lists(uuids, max_size=50))
def test_text_and_raw_bytes_give_the_same_array(ids: list[UUID]) -> None:
    from_text = ids_from_text([str(u) for u in ids])
    from_bytes = ids_from_bytes(b"".join(u.bytes for u in ids))

    assert from_text is not None
    assert from_text.tobytes() == from_bytes.tobytes()
    assert [UUID(bytes=row.tobytes()) for row in from_bytes] == ids


@given(st.lists(uuids, max_size=50))
def test_a_json_lists_items_give_the_same_array(ids: list[UUID]) -> None:
    # The items of ["<id>","<id>"] as orjson writes them, brackets cut off.
    items = orjson.dumps(ids)[1:-1]

    parsed = ids_from_json_items(items)

    assert parsed is not None
    assert parsed.tobytes() == b"".join(u.bytes for u in ids)


def test_json_items_that_are_not_quoted_canonical_ids_are_declined() -> None:
    good = b'"0195f2a4-7b3c-7def-8123-456789abcdef"'
    for bad in (
        good + b", " + good,  # a space
        good + b"," + good[:-1] + b"'",  # another quote
        good + b"," + good + b",",  # a trailing comma
        good.replace(b"-", b"_"),  # no dashes
        good[:5] + b"\\" + good[7:],  # an escape
        b"1," + good[:-2] + b'"',  # a number, and the count still whole
        good[:3] + b" " + good[4:],  # a space for a digit (fromhex would skip it)
        good[:3] + b"-" + good[4:],  # a mark character for a digit (the deletion takes it)
        good[:3] + b"," + good[4:],
        good[:3] + b"\xc3" + good[4:],  # not ASCII
    ):
        assert ids_from_json_items(bad) is None, bad


def test_upper_case_hex_is_the_same_id() -> None:
    uid = UUID("0195f2a4-7b3c-7def-8123-456789abcdef")

    parsed = ids_from_text([str(uid).upper()])

    assert parsed is not None and parsed.tobytes() == uid.bytes


def test_anything_but_the_canonical_spelling_is_declined() -> None:
    good = "0195f2a4-7b3c-7def-8123-456789abcdef"
    # UUID() accepts the first three; the fast path leaves them to the exact one.
    for bad in (
        "{" + good + "}",
        good.replace("-", ""),
        "urn:uuid:" + good,
        good[:-1] + "g",
        good[:8] + "x" + good[9:],
    ):
        assert ids_from_text([good, bad]) is None
    # Lengths that add up to whole ids but split them differently.
    assert ids_from_text([good[:-1], good + "0"]) is None
    assert ids_from_text(["é" * 36]) is None
    # A space or a dash where a digit belongs: the digit count or the byte count falls short.
    assert ids_from_text([good[:3] + " " + good[4:]]) is None
    assert ids_from_text([good[:3] + "-" + good[4:]]) is None


def test_bytes_that_are_not_whole_ids_are_refused() -> None:
    try:
        ids_from_bytes(b"\x00" * 17)
    except ValueError as exc:
        assert "17 bytes" in str(exc)
    else:
        raise AssertionError("17 bytes were taken for ids")


@given(
    blocks=st.lists(st.lists(uuids, min_size=1, max_size=20, unique=True), min_size=1, max_size=6),
    strangers=st.lists(uuids, max_size=10),
    forget=st.integers(0, 130),
)
def test_each_id_maps_to_its_row_until_its_block_is_forgotten(
    blocks: list[list[UUID]], strangers: list[UUID], forget: int
) -> None:
    # Given blocks of ids added as consecutive rows (ids unique across blocks)
    index, rows_of, block_end, first = IdIndex(), {}, {}, 0
    for block in blocks:
        fresh = [u for u in block if u not in rows_of]
        index.add(ids_from_bytes(b"".join(u.bytes for u in fresh)), first)
        for i, u in enumerate(fresh):
            rows_of[u], block_end[u] = first + i, first + len(fresh)
        first += len(fresh)
    strangers = [u for u in strangers if u not in rows_of]

    # When the blocks wholly before row `forget` are forgotten and every id is looked up, shuffled
    index.forget_before(forget)
    asked = sorted(rows_of, key=lambda u: u.int % 7919) + strangers
    rows = index.lookup(ids_from_bytes(b"".join(u.bytes for u in asked)))

    # Then an id maps to its row while its block is kept, else to -1
    for u, row in zip(asked, rows.tolist(), strict=True):
        assert row == (rows_of[u] if u in rows_of and block_end[u] > forget else -1)


def test_ids_sharing_their_second_half_are_told_apart() -> None:
    # Given ids that differ only in their first 8 bytes (the index sorts on the second 8)
    ids = np.zeros((6, 2), np.uint64)
    ids[:, 0] = [5, 1, 4, 2, 6, 3]
    ids[:, 1] = 42
    index = IdIndex()
    index.add(ids[:5], 100)
    members = IdSet()
    members.add(ids[2:4])

    # Then each is found at its own row, the one never added is not, and membership is exact
    assert index.lookup(ids[::-1]).tolist() == [-1, 104, 103, 102, 101, 100]
    assert members.contains(ids).tolist() == [False, False, True, True, False, False]
    assert not IdSet() and not IdSet().contains(ids).any()
