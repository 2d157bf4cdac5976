"""Prediction ids as arrays of their 16 raw bytes, and an index from them to row numbers.

The bulk replay meets ~2 ids per example (the ``Made`` row's and the label's) and looks
up every id an update trained on. As ``str`` keys of a dict that was ~40 % of its Python
time; as pairs of ``uint64`` (the id's 16 bytes, as PostgreSQL's ``uuid_send`` sends
them) the same work is a few numpy calls per range of the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ID_BYTES = 16
TEXT_LENGTH = 36  # canonical 8-4-4-4-12 text
JSON_ITEM_LENGTH = TEXT_LENGTH + 3  # an id in a JSON list as orjson writes it: quotes, then a comma
_DASHES = [8, 13, 18, 23]
# An item's quote, dashes, closing quote and comma, and their columns.
_ITEM_MARK_COLUMNS = [0, *(1 + d for d in _DASHES), TEXT_LENGTH + 1, TEXT_LENGTH + 2]
_ITEM_MARKS = np.frombuffer(b'"----",', np.uint8)


def ids_from_bytes(raw: bytes) -> np.ndarray:
    """Ids sent back to back as 16 raw bytes each, as an ``[n, 2]`` ``uint64`` array."""
    if len(raw) % ID_BYTES:
        raise ValueError(f"{len(raw)} bytes are not a whole number of {ID_BYTES}-byte ids")
    return np.frombuffer(raw, np.uint64).reshape(-1, 2)


def ids_from_text(keys: Sequence[str]) -> np.ndarray | None:
    """``8-4-4-4-12`` hex ids (either case) as an ``[n, 2]`` ``uint64`` array of their bytes; None if any is not one.

    The same 16 bytes ``UUID(key).bytes`` holds, so an id compares equal whichever way
    it was read. Any other spelling ``UUID`` would accept (braces, ``urn:uuid:``, no
    dashes) gives None: the caller then takes its exact, slower path.
    """
    n = len(keys)
    if n == 0:
        return np.zeros((0, 2), np.uint64)
    if not (np.fromiter(map(len, keys), np.int64, n) == TEXT_LENGTH).all():
        return None
    try:
        text = "".join(keys).encode("ascii")
    except UnicodeEncodeError:
        return None
    letters = np.frombuffer(text, np.uint8).reshape(n, TEXT_LENGTH)
    if not (letters[:, _DASHES] == ord("-")).all():
        return None
    return _ids_from_hex(text, n, b"-")


def ids_from_json_items(text: bytes) -> np.ndarray | None:
    """The items of a JSON list of ids as orjson writes them (``"<id>","<id>"``, no spaces) as ``[n, 2]`` ``uint64``.

    Each item must be a canonical ``8-4-4-4-12`` hex id in quotes (either case, as for
    ``ids_from_text``); anything else (an escape, a space, another value) gives None.
    """
    if not text:
        return np.zeros((0, 2), np.uint64)
    if (len(text) + 1) % JSON_ITEM_LENGTH:
        return None
    items = np.frombuffer(text + b",", np.uint8).reshape(-1, JSON_ITEM_LENGTH)
    if not (items[:, _ITEM_MARK_COLUMNS] == _ITEM_MARKS).all():
        return None
    return _ids_from_hex(text, len(items), b'"-,')


def _ids_from_hex(text: bytes, n: int, marks: bytes) -> np.ndarray | None:
    # `n` ids whose marks (dashes, quotes, commas) were found at their columns: what is
    # left once every mark character is deleted must be 32 hex digits per id. A mark
    # character in a digit's column, or a space (which fromhex would skip), leaves fewer
    # digits or bytes than that, so the two length checks make the decode exact.
    digits = text.translate(None, marks)
    if len(digits) != 2 * ID_BYTES * n:
        return None
    try:
        raw = bytes.fromhex(digits.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if len(raw) != ID_BYTES * n:
        return None
    return np.frombuffer(raw, np.uint64).reshape(n, 2)


@dataclass(frozen=True)
class _Block:
    # Rows first .. first + len(high) - 1, searchable by the ids' second half.
    first: int
    low_sorted: np.ndarray
    order: np.ndarray
    high: np.ndarray

    @property
    def end(self) -> int:
        return self.first + len(self.high)

    def row_of(self, key: np.ndarray, at: int) -> int:
        """The row of ``key`` among the entries from sorted position ``at`` that share its second half; -1 if none."""
        while at < len(self.order) and self.low_sorted[at] == key[1]:
            if self.high[self.order[at]] == key[0]:
                return self.first + int(self.order[at])
            at += 1
        return -1


class IdIndex:
    """Ids to row numbers, added a block of consecutive rows at a time.

    An id added twice maps to one of its rows (the replay adds each ``Made`` id once).

    A lookup searches the newest blocks first (the examples an update trains on were
    mostly read just before it) with a binary search on the ids' second 8 bytes (random
    bits for the service's time-ordered ids), then checks the first 8 bytes too.
    """

    def __init__(self) -> None:
        self.blocks: list[_Block] = []

    def add(self, ids: np.ndarray, first: int) -> None:
        """Index ``ids`` (``[n, 2]`` ``uint64``) as rows ``first`` .. ``first + n - 1``."""
        if len(ids) == 0:
            return
        low = ids[:, 1]
        order = np.argsort(low, kind="stable")
        self.blocks.append(_Block(first, low[order], order, ids[:, 0].copy()))

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """The row of each id (``int64``), -1 for one never added or forgotten."""
        rows = np.full(len(ids), -1, np.int64)
        # Needles in order: numpy's search then starts each from the last one's place,
        # ~4x faster than random order even with the sort counted. Sorted once: the ids
        # not found in a block stay in order for the next.
        todo = np.argsort(ids[:, 1])
        for block in reversed(self.blocks):
            if todo.size == 0:
                break
            low = ids[todo, 1]
            at = np.searchsorted(block.low_sorted, low)
            np.minimum(at, len(block.order) - 1, out=at)
            which = block.order[at]
            same_low = block.low_sorted[at] == low
            hit = same_low & (block.high[which] == ids[todo, 0])
            rows[todo[hit]] = block.first + which[hit]
            for k in np.flatnonzero(same_low & ~hit).tolist():
                # Another id shares this one's second half (1 in 2**62 per pair): look
                # at every entry with that half, so a lookup is never wrong nor missed.
                rows[todo[k]] = block.row_of(ids[todo[k]], int(at[k]))
            todo = todo[rows[todo] < 0]
        return rows

    def forget_before(self, row: int) -> None:
        """Drop the blocks whose rows all precede ``row``: their ids are then unmet."""
        self.blocks = [b for b in self.blocks if b.end > row]


class IdSet:
    """A set of ids, added in batches, asked about in batches (``[n, 2]`` ``uint64`` arrays)."""

    def __init__(self) -> None:
        self._index = IdIndex()
        self._size = 0

    def __bool__(self) -> bool:
        return self._size > 0

    def add(self, ids: np.ndarray) -> None:
        """Add these ids."""
        self._index.add(ids, self._size)
        self._size += len(ids)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id was added (a ``bool`` array)."""
        if not self._size:
            return np.zeros(len(ids), bool)
        return self._index.lookup(ids) >= 0
