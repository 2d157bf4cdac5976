"""Test-then-train through the full ledger path: every prediction, label and update an event."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import numpy as np

from domain.ids import new_prediction_id
from domain.ledger import LabelRequest, LabelStatus
from domain.prediction import Prediction, make_prediction_event
from projections.digest import state_to_bytes
from projections.learners import decide_rows
from projections.learning import LabeledExample
from projections.rollout import routes_to_candidate
from server.catalog import served_by
from server.services import LedgerService
from server.streams import label_arrivals

ProgressFn = Callable[["SimulationProgress"], None]


@dataclass
class SimulationProgress:
    """Running figures, reported after every commit."""

    predictions: int = 0
    labels: int = 0
    late_labels: int = 0
    updates: int = 0
    rejected_updates: int = 0
    correct: int = 0
    log_loss_sum: float = 0.0
    squared_error_sum: float = 0.0
    commits: int = 0
    model_version: int = 0
    seconds: float = 0.0

    @property
    def accuracy(self) -> float | None:
        """Prequential accuracy so far (classification only)."""
        return self.correct / self.predictions if self.predictions else None


@dataclass
class SimulationResult:
    """What a simulation run reports."""

    model: str
    examples: int
    labels: int
    late_labels: int
    updates: int
    rejected_updates: int
    model_version: int
    params_digest: str
    accuracy: float | None
    log_loss: float | None
    rmse: float | None
    seconds: float
    examples_per_s: float
    pending_labels: int
    extra: dict[str, Any] = field(default_factory=dict)


def run_simulation(
    service: LedgerService,
    model_name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    label_delays: np.ndarray | None = None,
    actor: str = "simulate",
    label_source: str = "simulation",
    commit_every: int = 4000,
    progress: ProgressFn | None = None,
) -> SimulationResult:
    """Predict each example with the current model, then deliver labels, learning online.

    Example ``i``'s label arrives right after prediction ``i + label_delays[i]``; labels
    due at the same step arrive in descending example order, so feedback is routinely
    out of order. Predictions are scored in vectorised chunks, but only across stretches
    where no update can fire, so every score is exactly what one-at-a-time serving would
    have produced. Events are committed in log order, many per transaction.
    """
    setup_started = time.perf_counter()
    n = int(x.shape[0])
    deliveries = label_arrivals(np.zeros(n, dtype=np.int64) if label_delays is None else label_delays)

    learner = service.live_learner(model_name)
    # The clock starts once the learner is loaded and its step compiled (one-time set-up,
    # ~1 s of XLA compile in a fresh process; reported apart as ``setup_s``): the rate is
    # the rate of examples, as River's is.
    started = time.perf_counter()
    setup_s = started - setup_started
    spec = learner.model.spec
    model_id: UUID = learner.model.id
    stats = SimulationProgress(model_version=learner.version)
    made: dict[int, Prediction.Made] = {}
    pending_events: list[Any] = []
    snapshots_due: list[tuple[int, Any, str]] = []
    classification = spec.head != "regression"

    # One background committer: the next chunk is computed while the previous one is
    # written (the database round trips release the GIL). A single worker keeps commit
    # order equal to log order; at most one batch is in flight, so memory stays bounded.
    committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simulate-commit")
    in_flight: list[Future[None]] = []

    def write(events: list[Any], rows: list[Any] | None, snapshots: list[tuple[int, Any, str]]) -> None:
        if rows is None:
            service.ledger.record(events)
        else:
            service.ledger.record_rows(rows)
        if service.store is not None:
            for version, state, digest in snapshots:
                service.store.put_snapshot(model_id, version, digest, state_to_bytes(state))

    def commit(*, wait: bool = False) -> None:
        while in_flight:
            in_flight.pop().result()  # re-raises a failed commit here, in order
        # Encode here: the committer thread then only does I/O, which releases the GIL,
        # instead of competing with the learner's dispatches for it.
        rows = service.ledger.encode_rows(pending_events)
        in_flight.append(committer.submit(write, list(pending_events), rows, list(snapshots_due)))
        pending_events.clear()
        snapshots_due.clear()
        if wait:
            in_flight.pop().result()
        stats.commits += 1
        stats.model_version = learner.version
        stats.seconds = time.perf_counter() - started
        if progress is not None:
            progress(stats)

    i = 0
    while i < n:
        # Extend the chunk until enough labels will have arrived for the next step.
        need = spec.batch_size - len(learner.buffer) if not learner.model.paused else n + 1
        j, arriving = i, 0
        while j < n:
            arriving += len(deliveries[j])
            j += 1
            if arriving >= need:
                break
        now = datetime.now(UTC)
        served = served_by(learner)  # during a rollout: the champion, the candidate beside it
        pids = [new_prediction_id() for _ in range(i, j)]
        proba = learner.learner.predict_proba(served.state, x[i:j])
        arms = [served] * (j - i)
        if served.candidate is not None:
            candidate = served.candidate
            for r, pid in enumerate(pids):
                if routes_to_candidate(pid, served.fraction):
                    arms[r] = candidate
                    proba[r] = learner.learner.predict_proba(candidate.state, x[i + r : i + r + 1])[0]
        scores, decisions = decide_rows(spec, proba)
        score_chunk(stats, spec.head, proba, decisions, y[i:j])
        rows = x[i:j].tolist()
        for k in range(i, j):
            arm = arms[k - i]
            routing = "champion" if served.candidate is None else ("candidate" if arm is not served else "control")
            event = make_prediction_event(
                pids[k - i],
                model_id=model_id,
                model_name=model_name,
                model_version=arm.version,
                spec=spec,
                features=rows[k - i],
                score=float(scores[k - i]),
                decision=float(decisions[k - i]),
                params_digest=arm.digest,
                routing=routing,
                actor=actor,
                timestamp=now,
            )
            made[k] = event
            pending_events.append(event)
        stats.predictions += j - i
        requests = [
            LabelRequest(made[k].originator_id, float(y[k]), label_source, now, actor)
            for t in range(i, j)
            for k in deliveries[t]
        ]
        pending = {made[k].originator_id: made[k] for t in range(i, j) for k in deliveries[t]}
        outcomes = service.ledger.prepare_labels(requests, received_at=now, pending=pending)
        for outcome in outcomes:
            if outcome.event is None:
                continue
            pending_events.append(outcome.event)
            stats.labels += 1
            if outcome.status is LabelStatus.LATE:
                stats.late_labels += 1
                continue
            source = pending[outcome.prediction_id]
            learner.add(
                LabeledExample(
                    outcome.prediction_id,
                    source.features,
                    outcome.event.label,
                    score=source.score,
                    decision=source.decision,
                    routing=source.routing,
                )
            )
        for t in range(i, j):
            for k in deliveries[t]:
                del made[k]
        while learner.ready():
            events = learner.step()
            pending_events.extend(events)
            for ev in events:
                if type(ev).__name__ == "UpdateApplied":
                    stats.updates += 1
                    if ev.originator_version % service.snapshot_interval == 0:
                        snapshots_due.append((ev.originator_version, learner.state, learner.digest))
                elif type(ev).__name__ == "UpdateRejected":
                    stats.rejected_updates += 1
        if len(pending_events) >= commit_every:
            commit()
        i = j
    try:
        if pending_events or stats.commits == 0 or in_flight:
            commit(wait=True)
    finally:
        committer.shutdown(wait=True)
    seconds = time.perf_counter() - started
    return SimulationResult(
        model=model_name,
        examples=stats.predictions,
        labels=stats.labels,
        late_labels=stats.late_labels,
        updates=stats.updates,
        rejected_updates=stats.rejected_updates,
        model_version=learner.version,
        params_digest=learner.digest,
        accuracy=stats.accuracy if classification else None,
        log_loss=stats.log_loss_sum / max(stats.predictions, 1) if classification else None,
        rmse=math.sqrt(stats.squared_error_sum / max(stats.predictions, 1)) if not classification else None,
        seconds=seconds,
        examples_per_s=stats.predictions / seconds if seconds > 0 else 0.0,
        pending_labels=len(learner.buffer),
        extra={"setup_s": round(setup_s, 3)},
    )


def score_chunk(
    stats: SimulationProgress, head: str, proba: np.ndarray, decisions: np.ndarray, labels: np.ndarray
) -> None:
    """Prequential metrics for a chunk: each score was made before its label was known."""
    eps = 1e-15
    if head == "binary":
        p1 = np.clip(proba[:, 0], eps, 1 - eps)
        stats.log_loss_sum += float(-np.sum(np.where(labels == 1.0, np.log(p1), np.log1p(-p1))))
        stats.correct += int(np.sum(decisions == labels))
    elif head == "multiclass":
        p = np.clip(proba[np.arange(len(labels)), labels.astype(np.int64)], eps, 1.0)
        stats.log_loss_sum += float(-np.sum(np.log(p)))
        stats.correct += int(np.sum(decisions == labels))
    else:
        stats.squared_error_sum += float(np.sum((proba[:, 0] - labels) ** 2))
