"""The online learning loop for one model: labeled predictions in, update events out."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import numpy as np

from domain.errors import FailedPreconditionError
from domain.model import Model
from projections.digest import state_digest
from projections.learners import Learner, LearnerState, decide, make_batch, make_learner

LEARNER_ACTOR = "learner"


@dataclass(frozen=True)
class LabeledExample:
    """A label matched to the features its prediction was served with."""

    prediction_id: UUID
    features: tuple[float, ...]
    label: float
    # When the learner received it (time.monotonic()): decides only when a partial
    # batch is due under ``max_batch_wait_s``; the batch taken is what gets recorded.
    received: float = 0.0


@dataclass(frozen=True)
class Scored:
    """One served score: what ``Prediction.Made`` records."""

    score: float
    decision: float


class ModelLearner:
    """Keeps one model's live state and turns its labels into recorded updates.

    Labels are taken strictly in log order; every ``batch_size`` of them become one
    step. The step is computed by the same jitted function replay uses, and the decision
    (batch membership and order, verdict, digest) is appended to the ``Model`` aggregate.
    The caller commits the events; only then may the new state serve (``commit``).
    """

    def __init__(self, model: Model, state: LearnerState, *, actor: str = LEARNER_ACTOR):
        self.model = model
        self.learner: Learner = make_learner(model.spec)
        self.state = state
        self.digest = state_digest(state)
        self.actor = actor
        self.buffer: deque[LabeledExample] = deque()

    def warm_up(self) -> None:
        """Compile the step and the scorer now, not on the first live batch.

        An all-padding batch is stepped and thrown away; the live state is untouched.
        Without this the first step of a fresh process stalls learning for a second or
        two while XLA compiles, and predictions keep being served by the old version.
        """
        spec = self.model.spec
        empty = make_batch(spec, np.zeros((0, spec.n_features)), np.zeros((0,)))
        _, metrics = self.learner.update_step(self.state, empty)
        np.asarray(metrics["summary"])
        self.learner.predict_proba(self.state, np.zeros((1, spec.n_features)))

    @property
    def version(self) -> int:
        """The model version the live state corresponds to."""
        return int(self.model.version)

    def add(self, example: LabeledExample) -> None:
        """Queue a labeled example (in log order)."""
        self.buffer.append(example)

    def ready(self, now: float | None = None) -> bool:
        """Whether a batch is due: a full one, or (with ``now``) a partial one that waited.

        Args:
            now: ``time.monotonic()``; when given, a partial batch whose oldest label has
                waited ``spec.max_batch_wait_s`` is due too.
        """
        if self.model.paused or not self.buffer:
            return False
        spec = self.model.spec
        if len(self.buffer) >= spec.batch_size:
            return True
        return now is not None and spec.max_batch_wait_s > 0 and now - self.buffer[0].received >= spec.max_batch_wait_s

    def next_due(self) -> float | None:
        """When a partial batch becomes due (monotonic seconds), or None."""
        spec = self.model.spec
        if self.model.paused or not self.buffer or spec.max_batch_wait_s <= 0:
            return None
        return self.buffer[0].received + spec.max_batch_wait_s

    def step(self, now: float | None = None) -> list[Any]:
        """Take one batch, compute the step, and return the events that record it.

        A step whose parameters come out non-finite is recorded as ``UpdateRejected`` and
        the served state does not change.
        """
        if not self.ready(now):
            raise FailedPreconditionError("no batch is due, or learning is paused")
        spec = self.model.spec
        taken = [self.buffer.popleft() for _ in range(min(spec.batch_size, len(self.buffer)))]
        x = np.asarray([e.features for e in taken], dtype=np.float64)
        y = np.asarray([e.label for e in taken], dtype=np.float64)
        ids = tuple(e.prediction_id for e in taken)
        candidate, metrics = self.learner.update_step(self.state, make_batch(spec, x, y))
        loss_before, loss_after, _, finite_flag = (float(v) for v in np.asarray(metrics["summary"]))
        digest = state_digest(candidate)
        if finite_flag == 1.0 and math.isfinite(loss_before) and math.isfinite(loss_after):
            self.model.apply_update(ids, int(candidate.step), loss_before, loss_after, digest, self.actor)
            self.state, self.digest = candidate, digest
        else:
            self.model.reject_update(ids, "non-finite parameters after the step", loss_before, loss_after, self.actor)
        return list(self.model.collect_events())

    def predict(self, rows: np.ndarray) -> list[Scored]:
        """Scores and decisions for feature rows, from the live state."""
        proba = self.learner.predict_proba(self.state, rows)
        return [Scored(*decide(self.model.spec, p)) for p in proba]

    def reset_to(self, model: Model, state: LearnerState) -> None:
        """Adopt a new head (after a rollback or another writer's change)."""
        self.model = model
        self.state = state
        self.digest = state_digest(state)
