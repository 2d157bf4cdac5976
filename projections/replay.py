"""Replay: the left fold that rebuilds a model's learner state from the log.

"Time" here is the model version (the aggregate version), never the wall clock. The fold
has one dispatch point; an event it does not know is an error, never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import numpy as np

from domain.errors import LedgerError, VersionNotFoundError
from domain.ledger import Ledger
from domain.model import STATE_KEEPING_EVENTS, Model
from domain.prediction import Prediction
from domain.spec import LearnerSpec
from projections.digest import state_digest, state_from_bytes, state_to_bytes
from projections.learners import Learner, LearnerState, make_batch, make_learner
from projections.rebaseline import refit
from projections.safety import Example, SafetyContext, evaluate_gate
from projections.store import LedgerRecorder

PREFETCH_UPDATES = 64


class ReplayError(LedgerError):
    """The log cannot be folded: a batch names a missing or unlabeled prediction, etc."""


class UnknownEventError(ReplayError):
    """The fold met an event type it has no rule for."""


@dataclass(frozen=True)
class FoldedState:
    """A model's learner state at one version, with its digest."""

    model_id: UUID
    version: int
    state: LearnerState
    digest: str


@dataclass
class Divergence:
    """The first version whose replayed digest differs from the recorded one."""

    version: int
    event: str
    recorded: str
    replayed: str


@dataclass
class VerifyReport:
    """Outcome of replaying one model's whole history."""

    model: str
    versions_checked: int
    updates_replayed: int
    divergence: Divergence | None = None
    platform_differences: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        """True when every recorded digest was reproduced."""
        return self.divergence is None


def examples_for(
    ledger: Ledger, model_id: UUID, spec: LearnerSpec, ids: Sequence[UUID], known: dict[UUID, Prediction] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Features as used and labels of labeled predictions, in the given order.

    Raises:
        ReplayError: a prediction is missing, unlabeled, of another model, or was late.
    """
    found = known if known is not None else ledger.get_predictions(ids)
    x = np.empty((len(ids), spec.n_features), dtype=np.float64)
    y = np.empty((len(ids),), dtype=np.float64)
    for row, pid in enumerate(ids):
        prediction = found.get(pid)
        if prediction is None or not prediction.is_labeled:
            raise ReplayError(f"update batch names prediction {pid}, which is missing or unlabeled")
        if prediction.model_id != model_id:
            raise ReplayError(f"update batch names prediction {pid} of another model")
        if not prediction.in_window:
            raise ReplayError(f"update batch names prediction {pid}, whose label was late")
        x[row] = prediction.features
        y[row] = prediction.label
    return x, y


class Replayer:
    """Folds model histories; uses parameter snapshots as a cache when present."""

    def __init__(self, ledger: Ledger, *, snapshot_interval: int = 100, write_snapshots: bool = True):
        self.ledger = ledger
        self.snapshot_interval = snapshot_interval
        self.write_snapshots = write_snapshots
        recorder: Any = ledger.recorder
        self.store: LedgerRecorder | None = recorder if isinstance(recorder, LedgerRecorder) else None

    # --- public queries --------------------------------------------------------------

    def state_at(self, model_id: UUID, version: int | None = None, *, use_snapshots: bool = True) -> FoldedState:
        """The learner state at ``version`` (default: head): newest snapshot ≤ V, then fold.

        Raises:
            VersionNotFoundError: no such version.
        """
        head = self.ledger.get_model_by_id(model_id)
        target = head.version if version is None else version
        if not 1 <= target <= head.version:
            raise VersionNotFoundError(f"model {head.name!r} has versions 1 to {head.version}, not {target}")
        learner = make_learner(head.spec)
        start: FoldedState | None = None
        if self.store is not None and use_snapshots:
            snap = self.store.get_snapshot(model_id, target)
            if snap is not None:
                restored = state_from_bytes(learner.init(), snap.state)
                if state_digest(restored) == snap.digest:
                    start = FoldedState(model_id, snap.version, restored, snap.digest)
        # Only what the snapshot does not cover: reading every event up to V made time
        # travel grow with history (4.3 s at 10^6 labeled examples; bench/time_travel.py).
        events = self.ledger.get_model_events(model_id, gt=start.version if start is not None else None, lte=target)
        folded = start
        for step in self._fold(learner, head, events, start, use_snapshots=use_snapshots):
            folded = step
        assert folded is not None
        return folded

    def verify(self, model_id: UUID) -> VerifyReport:
        """Replay a model from genesis (no snapshots) and compare every recorded digest.

        The bulk fold (``projections.bulk_fold``: the log read forward in large pages,
        many recorded batches per jitted ``lax.scan``) does the work; it re-derives the
        safety verdicts with the same ``SafetyAuditor`` and is tested to report exactly
        what the step-by-step fold (``verify_stepwise``) reports.
        """
        from projections.bulk_fold import verify_fast  # it imports this module

        snapshots = self.snapshot_interval if self.write_snapshots and self.store is not None else None
        return verify_fast(self.ledger, model_id, snapshot_interval=snapshots)

    def verify_stepwise(self, model_id: UUID) -> VerifyReport:
        """``verify`` one event at a time: the reference the bulk fold is tested against."""
        from projections.platform import platform_differences

        head = self.ledger.get_model_by_id(model_id)
        learner = make_learner(head.spec)
        report = VerifyReport(model=head.name, versions_checked=0, updates_replayed=0)
        report.platform_differences = platform_differences(head.platform)
        events = self.ledger.get_model_events(model_id)
        auditor = SafetyAuditor(self.ledger, head, learner) if head.spec.policy.stateful else None
        before: LearnerState | None = None
        try:
            folds = self._fold(learner, head, events, None, check=False, use_snapshots=False)
            for index, (folded, event) in enumerate(zip(folds, events, strict=True)):
                recorded = _recorded_digest(event)
                report.versions_checked += 1
                if isinstance(event, Model.UpdateApplied):
                    report.updates_replayed += 1
                if recorded is not None and recorded != folded.digest:
                    report.divergence = Divergence(folded.version, type(event).__name__, recorded, folded.digest)
                    return report
                problem = auditor.check(events, index, before, folded.state) if auditor is not None else None
                if problem is not None:
                    report.divergence = Divergence(folded.version, type(event).__name__, "", problem)
                    return report
                before = folded.state
        except ReplayError as exc:
            report.divergence = Divergence(report.versions_checked + 1, "ReplayError", "", str(exc))
        return report

    # --- the fold ----------------------------------------------------------------------

    def _fold(
        self,
        learner: Learner,
        head: Model,
        events: Sequence[Any],
        start: FoldedState | None,
        *,
        check: bool = True,
        use_snapshots: bool = True,
    ) -> Iterator[FoldedState]:
        """Yield the folded state after each event. With ``check``, a digest mismatch raises."""
        model_id = head.id
        state = start.state if start is not None else None
        prefetched: dict[UUID, Prediction] = {}
        for index, event in enumerate(events):
            version = event.originator_version
            match event:
                case Model.Registered():
                    state = learner.init()
                case Model.UpdateApplied(prediction_ids=ids, replayed_ids=replayed):
                    if state is None:
                        raise ReplayError(f"version {version}: an update before registration")
                    if any(pid not in prefetched for pid in (*ids, *replayed)):
                        prefetched = self._prefetch(events, index)
                    x, y = examples_for(self.ledger, model_id, head.spec, (*ids, *replayed), prefetched)
                    state, _ = learner.update_step(state, make_batch(head.spec, x, y))
                case Model.Rebaselined(prediction_ids=ids, epochs=epochs):
                    if any(pid not in prefetched for pid in ids):
                        # A rebaseline's window reaches back over earlier updates: read it whole.
                        prefetched = {**self._prefetch(events, index), **self.ledger.get_predictions(ids)}
                    x, y = examples_for(self.ledger, model_id, head.spec, ids, prefetched)
                    state = refit(head.spec, learner, x, y, epochs)
                case Model.RolledBack(to_version=target) | Model.RolloutAborted(to_version=target):
                    state = self.state_at(model_id, target, use_snapshots=use_snapshots).state
                case _ if isinstance(event, STATE_KEEPING_EVENTS):
                    pass
                case _:
                    raise UnknownEventError(f"version {version}: no fold rule for {type(event).__name__}")
            assert state is not None
            digest = state_digest(state)
            recorded = _recorded_digest(event)
            if check and recorded is not None and recorded != digest:
                raise ReplayError(
                    f"version {version} ({type(event).__name__}): replayed digest {digest} "
                    f"differs from recorded {recorded}"
                )
            if self.write_snapshots and self.store is not None and version % self.snapshot_interval == 0:
                self.store.put_snapshot(model_id, version, digest, state_to_bytes(state))
            yield FoldedState(model_id, version, state, digest)

    def _prefetch(self, events: Sequence[Any], index: int) -> dict[UUID, Prediction]:
        # One query for the examples of the next PREFETCH_UPDATES updates instead of one
        # per update: reading, not computing, bounds replay speed.
        return self.ledger.get_predictions(_ids_ahead(events, index))


def _ids_ahead(events: Sequence[Any], index: int) -> list[UUID]:
    # Every prediction the next PREFETCH_UPDATES example-carrying events name.
    ids: list[UUID] = []
    taken = 0
    for event in events[index:]:
        if isinstance(event, (Model.UpdateApplied, Model.UpdateRejected)):
            ids.extend(event.prediction_ids)
            ids.extend(event.holdout_ids)
            ids.extend(event.replayed_ids)
        elif isinstance(event, Model.Rebaselined):
            ids.extend(event.prediction_ids)
        else:
            continue
        taken += 1
        if taken >= PREFETCH_UPDATES:
            break
    return ids


def _recorded_digest(event: Any) -> str | None:
    if isinstance(event, Model.Registered):
        return event.initial_digest
    if isinstance(
        event,
        (Model.UpdateApplied, Model.RolledBack, Model.Rebaselined, Model.RolloutAborted, Model.RolloutCompleted),
    ):
        return event.digest
    return None


def _example(prediction: Prediction) -> Example:
    assert prediction.label is not None
    return Example(
        prediction.id, tuple(prediction.features), float(prediction.label), prediction.score, prediction.decision
    )


class SafetyAuditor:
    """Re-derives, during a verify, every gate verdict, replay choice and drift detection.

    Fed the events in order with the states before and after each; the first event
    whose recorded decision differs from the re-derived one is returned as a divergence.
    """

    def __init__(self, ledger: Ledger, head: Model, learner: Learner):
        self.ledger = ledger
        self.spec = head.spec
        self.learner = learner
        self.context = SafetyContext(head.spec)
        self.expected_drift: tuple[str, UUID] | None = None
        self.known: dict[UUID, Prediction] = {}

    def check(self, events: Sequence[Any], index: int, before: LearnerState | None, after: LearnerState) -> str | None:
        """The reason event ``index`` does not re-derive, or None."""
        event = events[index]
        if self.expected_drift is not None:
            detector, at = self.expected_drift
            self.expected_drift = None
            if not (isinstance(event, Model.DriftDetected) and (event.detector, event.at_prediction) == (detector, at)):
                return f"re-derived drift detection ({detector} at prediction {at}) is not recorded here"
            return None
        if isinstance(event, Model.DriftDetected):
            return "a drift detection that the detectors do not re-derive"
        if not isinstance(event, (Model.UpdateApplied, Model.UpdateRejected)) or before is None:
            return None
        ids = (*event.prediction_ids, *event.holdout_ids, *event.replayed_ids)
        if any(pid not in self.known for pid in ids):
            self.known = self.ledger.get_predictions(_ids_ahead(events, index))
        trained = [_example(self.known[pid]) for pid in event.prediction_ids]
        holdout = [_example(self.known[pid]) for pid in event.holdout_ids]
        chosen = self.context.replay.choose(int(before.step) + 1, self.spec.batch_size)
        if tuple(e.prediction_id for e in chosen) != event.replayed_ids:
            return "the replay buffer's choice does not re-derive"
        accepted = isinstance(event, Model.UpdateApplied)
        candidate = after
        finite = True
        if not accepted:
            rows = [*trained, *chosen]
            x = np.asarray([e.features for e in rows], dtype=np.float64)
            y = np.asarray([e.label for e in rows], dtype=np.float64)
            candidate, metrics = self.learner.update_step(before, make_batch(self.spec, x, y))
            summary = [float(v) for v in np.asarray(metrics["summary"])]
            finite = summary[3] == 1.0 and all(np.isfinite(summary[:2]))
        self.context.holdout.extend(holdout)
        hx, hy = self.context.holdout_arrays()
        verdict = evaluate_gate(self.spec, self.learner, before, candidate, finite, hx, hy, self.context.anchor())
        recorded_reason = event.reason if isinstance(event, Model.UpdateRejected) else ""
        figures = {k: v if np.isfinite(v) else -1.0 for k, v in verdict.figures.items()}
        if verdict.accepted != accepted or verdict.reason != recorded_reason or (figures or None) != event.gate:
            return f"gate verdict does not re-derive (replayed: {verdict.reason or 'accepted'})"
        found = self.context.after_update(trained, holdout, accepted, after if accepted else before)
        if found is not None:
            self.expected_drift = (found.detector, found.at_prediction)
        return None


def safety_context_at(ledger: Ledger, model: Model, replayer: Replayer | None = None) -> SafetyContext:
    """The safety context a learner continues from at the model's head (no JAX steps).

    Windows are filled from the newest events backwards; the detectors are fed from the
    update after the last detection (a detection resets them).
    """
    context = SafetyContext(model.spec)
    policy = model.spec.policy
    if not policy.stateful:
        return context
    events = ledger.get_model_events(model.id)
    updates = [e for e in events if isinstance(e, (Model.UpdateApplied, Model.UpdateRejected))]
    last_drift = max((i for i, e in enumerate(events) if isinstance(e, Model.DriftDetected)), default=-1)
    watched = [e for e in events[last_drift + 1 :] if isinstance(e, (Model.UpdateApplied, Model.UpdateRejected))]
    wanted: list[UUID] = []
    # The holdout window and the anchors start afresh at a detection (SafetyContext.after_update).
    holdout_ids = [pid for e in watched for pid in e.holdout_ids][-policy.holdout_size :]
    trained_ids = [pid for e in updates for pid in e.prediction_ids][-(context.recent.maxlen or 0) :]
    pool_ids = [pid for e in updates if isinstance(e, Model.UpdateApplied) for pid in e.prediction_ids][
        -policy.replay_pool :
    ]
    wanted.extend(holdout_ids)
    wanted.extend(trained_ids)
    if policy.replay_fraction > 0.0:
        wanted.extend(pool_ids)
    if policy.drift_detectors:
        for e in watched:
            wanted.extend(e.prediction_ids)
            wanted.extend(e.holdout_ids)
    known = ledger.get_predictions(dict.fromkeys(wanted))
    context.holdout.extend(_example(known[pid]) for pid in holdout_ids)
    context.recent.extend(_example(known[pid]) for pid in trained_ids)
    if policy.replay_fraction > 0.0:
        context.replay.extend(_example(known[pid]) for pid in pool_ids)
    if policy.drift_detectors:
        for e in watched:
            context.drift.observe([_example(known[pid]) for pid in (*e.prediction_ids, *e.holdout_ids)])
    if policy.holdout_fraction > 0.0 and policy.gate_anchor_lag > 0 and replayer is not None:
        for e in watched[-policy.gate_anchor_lag :]:
            context.heads.append(replayer.state_at(model.id, e.originator_version).state)
    return context
