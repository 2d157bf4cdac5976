"""Identifier rules: time-ordered new ids, and idempotency keys mapped to UUIDs."""

from __future__ import annotations

import os
import random
import threading
import time
from uuid import NAMESPACE_URL, UUID, SafeUUID, uuid5

PREDICTION_KEY_NAMESPACE = uuid5(NAMESPACE_URL, "learnledger:prediction-key")
_lock = threading.Lock()
_last_ms = 0
_counter = 0
# Ids only need uniqueness, not secrecy: a per-process generator seeded from the OS is
# ~40x cheaper than an os.urandom call per id.
_random = random.Random(os.urandom(32))


def new_prediction_id() -> UUID:
    """A fresh UUIDv7-style id (48-bit millisecond time, then counter and random bits).

    Time-ordered keys insert ~1.6x faster than uuid4 at volume and keep the primary-key
    index compact; the wall clock only orders ids, it never reaches learned state.
    """
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
        else:
            _counter = 0
        _last_ms = ms
        counter = _counter & 0xFFF
        rand = _random.getrandbits(62)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand
    return UUID(int=value)


def new_prediction_ids(n: int) -> list[UUID]:
    """``n`` fresh ids at once: the same layout and ordering as ``new_prediction_id``.

    One clock read and one lock for the whole batch (a 256-row PredictBatch asks for
    256 ids; one by one they cost ~4 µs each, mostly the lock and ``UUID.__init__``).
    """
    global _last_ms, _counter
    if n <= 0:
        return []
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            first = _counter + 1
        else:
            first = 0
        _counter = first + n - 1
        _last_ms = ms
        rand = [_random.getrandbits(62) for _ in range(n)]
    head = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | 0b10 << 62
    new, setattr_, unknown = object.__new__, object.__setattr__, SafeUUID.unknown
    out = []
    for i in range(n):
        uid = new(UUID)  # UUID(int=...) without its range checks: the value always fits
        setattr_(uid, "int", head | ((first + i) & 0xFFF) << 64 | rand[i])
        setattr_(uid, "is_safe", unknown)
        out.append(uid)
    return out


def prediction_id_for(key: str) -> UUID:
    """Map a client's idempotency key to the prediction's aggregate id.

    A key that is already a UUID is used as is; any other string maps through uuid5, so
    the same key always names the same prediction.
    """
    try:
        return UUID(key)
    except ValueError:
        return uuid5(PREDICTION_KEY_NAMESPACE, key)
