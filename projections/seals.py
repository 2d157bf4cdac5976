"""Sealing the log and checking the seals: which rows changed since they were sealed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from domain.ledger import Ledger
from domain.seal import GENESIS, SEALS_ID, LogSeals, leaf_hash, merkle_root, seal_hash
from projections.store import LedgerRecorder

MAX_ROWS_PER_SEAL = 200_000


@dataclass(frozen=True)
class Tampering:
    """One finding: a row changed, removed or added after sealing, or a broken seal."""

    kind: str  # "modified" | "deleted" | "inserted" | "range" | "chain"
    position: int
    detail: str


@dataclass
class SealReport:
    """Outcome of checking every seal against the rows it covers."""

    seals_checked: int = 0
    positions_sealed: int = 0
    head: str = GENESIS
    findings: list[Tampering] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """True when every seal and every sealed row is intact."""
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {
            "verified": self.verified,
            "seals_checked": self.seals_checked,
            "positions_sealed": self.positions_sealed,
            "head_seal": self.head,
            "findings": [{"kind": f.kind, "position": f.position, "detail": f.detail} for f in self.findings],
        }


def seal_log(ledger: Ledger, *, actor: str) -> LogSeals.Sealed | None:
    """Seal every position after the last seal (up to ``MAX_ROWS_PER_SEAL`` rows).

    Leaf hashes are stored first (idempotent), then the seal event commits; a concurrent
    sealer that wins the race makes this a ``ConcurrencyError`` and nothing is sealed twice.

    Returns:
        The new seal, or None when nothing new was logged.
    """
    store = _store(ledger)
    try:
        seals: LogSeals = ledger.repository.get(SEALS_ID)
    except AggregateNotFoundError:
        seals = LogSeals()
    head = store.max_notification_id() or 0
    first = seals.last_position + 1
    last = min(head, first + MAX_ROWS_PER_SEAL - 1)
    if last < first:
        return None
    rows = store.select_sealable_rows(first, last)
    leaves = [(pos, leaf_hash(pos, oid, ver, topic, state)) for pos, oid, ver, topic, state in rows]
    store.put_seal_leaves(leaves)
    seals.seal(first, last, len(leaves), merkle_root([leaf for _, leaf in leaves]), actor)
    events = seals.collect_events()
    ledger.record(events)  # ConcurrencyError if another sealer got there first
    sealed = events[-1]
    assert isinstance(sealed, LogSeals.Sealed)
    return sealed


def verify_seals(ledger: Ledger) -> SealReport:
    """Check the seal chain, and every sealed range's rows against its Merkle root.

    Where a range does not match, the stored leaf hashes (themselves authenticated by
    the seal's root) name the exact positions that were modified, deleted or inserted.
    """
    store = _store(ledger)
    report = SealReport()
    previous, expected_first = GENESIS, 1
    for sealed in ledger.events.get(SEALS_ID):
        if not isinstance(sealed, LogSeals.Sealed):
            continue
        report.seals_checked += 1
        expected_seal = seal_hash(sealed.previous, sealed.first, sealed.last, sealed.count, sealed.root)
        if sealed.previous != previous or sealed.seal != expected_seal or sealed.first != expected_first:
            report.findings.append(Tampering("chain", sealed.first, f"seal {report.seals_checked} does not chain"))
        rows = store.select_sealable_rows(sealed.first, sealed.last)
        current = {
            pos: (leaf_hash(pos, oid, ver, topic, state), oid, ver, topic) for pos, oid, ver, topic, state in rows
        }
        root = merkle_root([current[pos][0] for pos in sorted(current)])
        if root != sealed.root or len(current) != sealed.count:
            report.findings.extend(_name_rows(store, sealed, current))
        report.positions_sealed += sealed.last - sealed.first + 1
        previous, expected_first = sealed.seal, sealed.last + 1
    report.head = previous
    return report


def _name_rows(
    store: LedgerRecorder, sealed: LogSeals.Sealed, current: dict[int, tuple[bytes, bytes, int, str]]
) -> list[Tampering]:
    stored = store.get_seal_leaves(sealed.first, sealed.last)
    if merkle_root([stored[pos] for pos in sorted(stored)]) != sealed.root or len(stored) != sealed.count:
        return [Tampering("range", sealed.first, f"positions {sealed.first}..{sealed.last} no longer match their seal")]
    findings = []
    for pos in sorted(set(stored) | set(current)):
        if pos not in current:
            findings.append(Tampering("deleted", pos, "the row at this position was removed"))
        elif pos not in stored:
            findings.append(Tampering("inserted", pos, "a row was added inside a sealed range"))
        elif current[pos][0] != stored[pos]:
            _, oid, ver, topic = current[pos]
            findings.append(Tampering("modified", pos, f"{topic} of {UUID(bytes=oid)} version {ver} was changed"))
    return findings


def _store(ledger: Ledger) -> LedgerRecorder:
    recorder: Any = ledger.recorder
    if not isinstance(recorder, LedgerRecorder):
        raise TypeError("sealing needs the PostgreSQL ledger recorder")
    return recorder
