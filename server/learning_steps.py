"""Pieces every learner shares, in-process (``serve``) or as its own process (``learn``).

Kept free of threads and I/O policy: stepping a ``ModelLearner`` until no batch is due,
the snapshots to cache once those steps committed, where in the log a learner resumes
(exactly-once), and turning committed label events into learnable examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.utils import get_topic

from domain.ledger import Ledger
from domain.model import Model
from domain.prediction import DEFAULT_LABELED_TOPIC, LABELED_TOPIC, Prediction
from projections.digest import state_to_bytes
from projections.learners import LearnerState
from projections.learning import LabeledExample, ModelLearner
from projections.store import LedgerRecorder
from server.log_reader import labeled_position

# Every event that changes what a model serves or whether it learns (Registered only
# creates the stream, which a reader loads on first use).
MODEL_CHANGE_TOPICS = tuple(
    get_topic(cls) for cls in (Model.UpdateApplied, Model.UpdateRejected, Model.RolledBack, Model.Paused, Model.Resumed)
)
LABEL_TOPICS = (LABELED_TOPIC, DEFAULT_LABELED_TOPIC)

Snapshot = tuple[int, LearnerState, str]


def drain(
    learner: ModelLearner, snapshot_interval: int, now: float | None = None, *, max_steps: int | None = None
) -> tuple[list[Any], list[Snapshot]]:
    """Step while a batch is due; return the events to commit and the snapshots to cache after.

    Args:
        learner: the model's learner (its live state advances; commit the events, or
            reload it from the log if the commit fails).
        snapshot_interval: cache the state of every version divisible by this.
        now: ``time.monotonic()`` to also take partial batches that waited
            ``max_batch_wait_s``; None for full batches only.
        max_steps: stop after this many steps (the rest stays buffered, in order).
    """
    events: list[Any] = []
    snapshots: list[Snapshot] = []
    while learner.ready(now) and (max_steps is None or len(events) < max_steps):
        for event in learner.step(now):
            events.append(event)
            version = event.originator_version
            if isinstance(event, Model.UpdateApplied) and version % snapshot_interval == 0:
                snapshots.append((version, learner.state, learner.digest))
    return events, snapshots


def save_snapshots(store: LedgerRecorder | None, model_id: UUID, snapshots: Sequence[Snapshot]) -> None:
    """Cache committed versions' parameters (only after their events committed: a cache
    entry for a version that never committed would be served by time travel)."""
    if store is None:
        return
    for version, state, digest in snapshots:
        store.put_snapshot(model_id, version, digest, state_to_bytes(state))


def resume_position(ledger: Ledger, model: Model) -> int:
    """The log position after which a learner of ``model`` finds its unlearned labels.

    It is the position of the label (or default label: both are version 2 of the
    prediction) of ``Model.learned_through``: the last prediction of the last recorded
    batch. That batch and the position it implies commit in one event, so a learner
    restarted at any point re-reads exactly the labels no batch has taken yet.
    """
    through = model.learned_through
    if through is None:
        return 0
    return labeled_position(ledger, through) or 0


def learnable(event: Any, model_id: UUID) -> bool:
    """Whether a label event is one ``model_id``'s learner takes: in-window real labels
    and default labels (a real label after a default is version 3 and late)."""
    if getattr(event, "model_id", None) != model_id:
        return False
    if isinstance(event, Prediction.DefaultLabeled):
        return True
    return isinstance(event, Prediction.Labeled) and bool(event.in_window)


def examples(
    ledger: Ledger, labels: Sequence[Prediction.Labeled | Prediction.DefaultLabeled], received: float
) -> list[LabeledExample]:
    """Examples for label events, in the given order, with the features *as used*.

    One bulk read of the ``Made`` events (they carry the features). On the ledger's own
    recorder only those rows' ``features`` field is decoded: rebuilding whole prediction
    aggregates cost ~220 µs a label, most of a learner's time at 5,000 labels/s.
    """
    if not labels:
        return []
    features = _features_of(ledger, [e.originator_id for e in labels])
    # A committed label's prediction is committed: a missing one is a KeyError, never a guess.
    return [LabeledExample(e.originator_id, features[e.originator_id], float(e.label), received) for e in labels]


def _features_of(ledger: Ledger, ids: list[UUID]) -> dict[UUID, tuple[float, ...]]:
    recorder: Any = ledger.recorder
    if isinstance(recorder, LedgerRecorder):
        states = recorder.select_states(ids, 1)
        # The state is the Made event's orjson encoding; floats round-trip exactly.
        return {pid: tuple(float(v) for v in orjson.loads(state)["features"]) for pid, state in states.items()}
    return {pid: tuple(p.features) for pid, p in ledger.get_predictions(ids).items()}
