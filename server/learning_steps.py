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
    get_topic(cls)
    for cls in (
        Model.UpdateApplied,
        Model.UpdateRejected,
        Model.RolledBack,
        Model.Paused,
        Model.Resumed,
        Model.DriftDetected,
        Model.Rebaselined,
        Model.RolloutAdvanced,
        Model.RolloutAborted,
        Model.RolloutCompleted,
    )
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
    served = served_facts(ledger, [e.originator_id for e in labels])
    # A committed label's prediction is committed: a missing one is a KeyError, never a guess.
    out = []
    for e in labels:
        features, score, decision, routing = served[e.originator_id]
        out.append(LabeledExample(e.originator_id, features, float(e.label), received, score, decision, routing))
    return out


ServedFacts = tuple[tuple[float, ...], float, float, str]


def served_facts(ledger: Ledger, ids: list[UUID]) -> dict[UUID, ServedFacts]:
    """Features, score, decision and routing of committed predictions, as ``Prediction.Made`` recorded them."""
    recorder: Any = ledger.recorder
    if isinstance(recorder, LedgerRecorder):
        states = recorder.select_states(ids, 1)
        out = {}
        for pid, state in states.items():
            # The state is the Made event's orjson encoding; floats round-trip exactly.
            made = orjson.loads(state)
            features = tuple(float(v) for v in made["features"])
            out[pid] = (features, float(made["score"]), float(made["decision"]), str(made["routing"]))
        return out
    return {pid: (tuple(p.features), p.score, p.decision, p.routing) for pid, p in ledger.get_predictions(ids).items()}


def load_learner(ledger: Ledger, replayer: Any, model_id: UUID) -> ModelLearner:
    """A model's learner at its head: state by replay (snapshots allowed), plus the safety
    context the gate, drift detectors and replay buffer need, rebuilt from the log.

    Every learner (in ``serve``, in ``learn``, in ``simulate``) is built here, so they all
    continue the same deterministic fold that ``audit verify`` replays.
    """
    model = ledger.get_model_by_id(model_id)
    folded = replayer.state_at(model.id, model.version)
    learner = ModelLearner(model, folded.state)
    learner.restore(ledger, replayer)
    return learner
