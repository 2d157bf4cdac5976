"""Tamper evidence: seals that chain Merkle roots over ranges of the notification log."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import InvalidArgumentError

SEALS_ID = uuid5(NAMESPACE_URL, "learnledger:log-seals")
GENESIS = "sha256:" + "0" * 64


def leaf_hash(position: int, originator_id: UUID | bytes, originator_version: int, topic: str, state: bytes) -> bytes:
    """The hash of one stored event row, framing every field so no two rows collide.

    The id may be given as a ``UUID`` or as its 16 bytes (``UUID.bytes``, what
    PostgreSQL's ``uuid_send`` gives): the same hash either way.
    """
    raw = originator_id.bytes if isinstance(originator_id, UUID) else originator_id
    if len(raw) != 16:
        raise InvalidArgumentError(f"an originator id is 16 bytes, not {len(raw)}")
    h = hashlib.sha256(b"learnledger-leaf\x00")
    h.update(struct.pack("<QQ", position, originator_version))
    h.update(raw)
    topic_bytes = topic.encode()
    h.update(struct.pack("<I", len(topic_bytes)) + topic_bytes)
    h.update(struct.pack("<Q", len(state)) + state)
    return h.digest()


def merkle_root(leaves: Sequence[bytes]) -> str:
    """Binary Merkle root (RFC 6962 style: 0x00 leaf and 0x01 node prefixes, odd node promoted)."""
    if not leaves:
        return GENESIS
    level = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]
    while len(level) > 1:
        nxt = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return "sha256:" + level[0].hex()


def seal_hash(previous: str, first: int, last: int, count: int, root: str) -> str:
    """The chained hash of one seal: it commits to the previous seal and to its range."""
    material = f"{previous}|{first}|{last}|{count}|{root}".encode()
    return "sha256:" + hashlib.sha256(material).hexdigest()


class LogSeals(Aggregate):
    """The single stream of seals; each seal covers the log positions after the last one."""

    class Started(Aggregate.Created):
        """The seal chain exists."""

    class Sealed(Aggregate.Event):
        """Positions ``first``..``last`` (``count`` rows) have Merkle root ``root``."""

        first: int
        last: int
        count: int
        root: str
        previous: str
        seal: str
        actor: str

    @event(Started)
    def __init__(self) -> None:
        self.last_position = 0
        self.last_seal = GENESIS
        self.seals = 0

    @staticmethod
    def create_id() -> UUID:
        """One chain per ledger."""
        return SEALS_ID

    def seal(self, first: int, last: int, count: int, root: str, actor: str) -> None:
        """Append a seal for the next range.

        Raises:
            InvalidArgumentError: the range does not start right after the last seal.
        """
        if first != self.last_position + 1 or last < first or count < 0:
            raise InvalidArgumentError(
                f"a seal must cover positions from {self.last_position + 1}; got {first}..{last}"
            )
        self._sealed(
            first, last, count, root, self.last_seal, seal_hash(self.last_seal, first, last, count, root), actor
        )

    @event(Sealed)
    def _sealed(self, first: int, last: int, count: int, root: str, previous: str, seal: str, actor: str) -> None:
        self.last_position = last
        self.last_seal = seal
        self.seals += 1
