"""Which recorded decisions a model version descends from, and what happened to it later.

Pure functions over a model's events (oldest first); "time" is the model version.
A rollback to version T makes the state equal T's, so the lineage of every later
version forgets the updates between T and the rollback: they no longer shape it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from domain.model import Model


@dataclass(frozen=True)
class GateVerdict:
    """The last accept/reject decision on a learner step at or before a version."""

    version: int
    verdict: str  # "applied" or "rejected"
    reason: str
    loss_before: float
    loss_after: float
    examples: int
    time: str
    actor: str


@dataclass(frozen=True)
class Lineage:
    """How the state at ``version`` came to be.

    ``update_ranges`` are the (first, last) runs of ``UpdateApplied`` versions whose
    steps, in this order, produce the state (after rollbacks pruned the abandoned ones;
    versions in a run that are not updates, e.g. a pause, change nothing); ``examples_digest``
    is the SHA-256 of their prediction ids (16 bytes each, in batch order), a compact
    commitment to exactly which labeled examples trained this version.
    """

    version: int
    updates: int
    update_ranges: tuple[tuple[int, int], ...]
    labeled_examples: int
    examples_digest: str
    updates_applied: int
    updates_rejected: int
    rollbacks: int
    last_gate: GateVerdict | None
    created_by: str


@dataclass(frozen=True)
class RollbackFact:
    """A rollback recorded after the prediction that abandoned its version."""

    version: int
    to_version: int
    reason: str
    actor: str
    time: str


@dataclass(frozen=True)
class LearnedFrom:
    """Where a prediction's own label went: the update that used it, if any."""

    applied_in_version: int | None
    rejected_in_versions: tuple[int, ...]
    still_in_head_lineage: bool | None


def lineage_at(events: Sequence[Any], version: int) -> Lineage:
    """Fold a model's events up to ``version`` into its lineage."""
    applied = rejected = rollbacks = 0
    gate: GateVerdict | None = None
    created_by = ""
    updates: list[int] = []
    for event in events:
        v = event.originator_version
        if v > version:
            break
        match event:
            case Model.UpdateApplied():
                updates.append(v)
                applied += 1
                gate = _verdict(event, "applied", "")
            case Model.UpdateRejected(reason=reason):
                rejected += 1
                gate = _verdict(event, "rejected", reason)
            case Model.RolledBack():
                rollbacks += 1
        if v == version:
            created_by = describe_event(event)
    batches = _kept_batches(events, version)
    digest = hashlib.sha256()
    for _, ids in batches:
        for pid in ids:
            digest.update(pid.bytes)
    return Lineage(
        version=version,
        updates=len(batches),
        update_ranges=_runs([u for u, _ in batches], updates),
        labeled_examples=sum(len(ids) for _, ids in batches),
        examples_digest="sha256:" + digest.hexdigest(),
        updates_applied=applied,
        updates_rejected=rejected,
        rollbacks=rollbacks,
        last_gate=gate,
        created_by=created_by,
    )


def rollbacks_affecting(events: Sequence[Any], version: int) -> tuple[RollbackFact, ...]:
    """Rollbacks recorded after ``version`` to a target older than it: they abandoned it."""
    return tuple(
        RollbackFact(e.originator_version, e.to_version, e.reason, e.actor, e.timestamp.isoformat())
        for e in events
        if isinstance(e, Model.RolledBack) and e.originator_version > version and e.to_version < version
    )


def learned_from(events: Sequence[Any], prediction_id: UUID) -> LearnedFrom:
    """Which update (if any) learned from this prediction's label, and whether it still counts."""
    applied: int | None = None
    rejected: list[int] = []
    for event in events:
        if isinstance(event, Model.UpdateApplied) and prediction_id in event.prediction_ids:
            applied = event.originator_version
        elif isinstance(event, Model.UpdateRejected) and prediction_id in event.prediction_ids:
            rejected.append(event.originator_version)
    still = None
    if applied is not None and events:
        still = applied in _lineage_versions(events, events[-1].originator_version)
    return LearnedFrom(applied, tuple(rejected), still)


def _lineage_versions(events: Sequence[Any], version: int) -> set[int]:
    return {v for v, _ in _kept_batches(events, version)}


def _kept_batches(events: Sequence[Any], version: int) -> list[tuple[int, tuple[UUID, ...]]]:
    # The updates whose steps make up the state at `version`: a rollback to T drops
    # every update after T (the state is T's again).
    kept: list[tuple[int, tuple[UUID, ...]]] = []
    for event in events:
        if event.originator_version > version:
            break
        if isinstance(event, Model.UpdateApplied):
            kept.append((event.originator_version, tuple(event.prediction_ids)))
        elif isinstance(event, Model.RolledBack):
            kept = [(u, ids) for u, ids in kept if u <= event.to_version]
    return kept


def _runs(kept: list[int], updates: list[int]) -> tuple[tuple[int, int], ...]:
    # Maximal runs of kept updates with no abandoned update between them.
    kept_set = set(kept)
    runs: list[list[int]] = []
    previous_kept = False
    for v in updates:
        if v in kept_set:
            if previous_kept:
                runs[-1][1] = v
            else:
                runs.append([v, v])
        previous_kept = v in kept_set
    return tuple((a, b) for a, b in runs)


def _verdict(event: Any, verdict: str, reason: str) -> GateVerdict:
    return GateVerdict(
        version=event.originator_version,
        verdict=verdict,
        reason=reason or "finite parameters after the step",
        loss_before=event.loss_before,
        loss_after=event.loss_after,
        examples=len(event.prediction_ids),
        time=event.timestamp.isoformat(),
        actor=event.actor,
    )


def drift_summary(model: Model, events: Sequence[Any]) -> str:
    """One sentence on drift detection over ``events``: what fired where, or why nothing did."""
    detectors = model.spec.policy.drift_detectors
    found = [e for e in events if isinstance(e, Model.DriftDetected)]
    if found:
        return "; ".join(
            f"version {e.originator_version}: {e.detector} fired at prediction {e.at_prediction} (action: {e.action})"
            for e in found
        )
    if not detectors:
        return "no drift detector is configured in this model's policy, so none could fire"
    return f"the configured detectors ({', '.join(detectors)}) did not fire"


def gate_summary(model: Model) -> str:
    """What every applied update was checked against, from the model's policy."""
    p = model.spec.policy
    checks = ["finite parameters after the step"]
    if p.max_update_norm > 0:
        checks.append(f"update norm at most {p.max_update_norm:g}")
    if p.weight_bound > 0:
        checks.append(f"every weight within ±{p.weight_bound:g}")
    if p.feature_bounds:
        checks.append("the declared per-feature envelope")
    if p.holdout_fraction > 0:
        checks.append(
            f"holdout loss shown within {p.gate_tolerance:g} of the current version's"
            + (f" and of the version {p.gate_anchor_lag} updates back" if p.gate_anchor_lag else "")
            + f" (paired t-test at {p.gate_alpha:g}, {p.holdout_fraction:.0%} of labels held out)"
        )
    return "every applied update passed the learner's gate: " + "; ".join(checks)


def describe_event(event: Any) -> str:
    """How a model version came to be, in a few plain words."""
    match event:
        case Model.Registered():
            return "registration (initial state)"
        case Model.UpdateApplied(prediction_ids=ids):
            return f"an update on {len(ids)} labeled examples"
        case Model.UpdateRejected():
            return "a rejected update (state unchanged)"
        case Model.RolledBack(to_version=target, reason=reason):
            return f"a rollback to version {target} ({reason})"
        case Model.Paused(reason=reason):
            return f"a pause ({reason}; state unchanged)"
        case Model.Resumed(reason=reason):
            return f"a resume ({reason}; state unchanged)"
        case Model.DriftDetected(detector=detector, action=action):
            return f"a drift detection by {detector} (action: {action}; state unchanged)"
        case Model.Rebaselined(prediction_ids=ids, epochs=epochs):
            return f"a rebaseline: re-fit on {len(ids)} examples × {epochs} epochs (a rollout candidate)"
        case Model.RolloutAdvanced(fraction=fraction):
            return f"a rollout step to {fraction:.0%} of traffic"
        case Model.RolloutAborted(to_version=target, reason=reason):
            return f"an aborted rollout: back to version {target}'s state ({reason})"
        case Model.RolloutCompleted(to_version=target):
            return f"a completed rollout: version {target}'s state serves all traffic"
    return type(event).__name__
