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
from projections.rebaseline import refit
from projections.rollout import StageTally, judge
from projections.safety import Detection, Example, SafetyContext, evaluate_gate, in_holdout, served_error

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
    # What was served (``Prediction.Made``): the drift detectors watch its error.
    score: float = 0.0
    decision: float = 0.0
    routing: str = "champion"

    def as_example(self) -> Example:
        """The safety fold's view of this example."""
        return Example(self.prediction_id, self.features, self.label, self.score, self.decision)


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
        self.safety = SafetyContext(model.spec)
        self.detections: list[Detection] = []  # this process's, for alerts
        # During a rollout the head state is the candidate's; the champion's serves the rest.
        self.champion: tuple[LearnerState, str] | None = None
        self.tally = StageTally()
        self.rollout_verdict: str | None = None

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
        if spec.policy.holdout_fraction > 0.0:  # the gate's one holdout shape
            size = spec.policy.holdout_size
            self.learner.losses(self.state, np.zeros((size, spec.n_features)), np.zeros((size,)))

    @property
    def version(self) -> int:
        """The model version the live state corresponds to."""
        return int(self.model.version)

    def add(self, example: LabeledExample) -> None:
        """Queue a labeled example (in log order); during a rollout, also judge the stage."""
        self.buffer.append(example)
        if self.model.rollout is not None and self.rollout_verdict is None:
            self.tally.add(
                example.routing, served_error(self.model.spec, example.score, example.decision, example.label)
            )
            self.rollout_verdict = judge(self.model, self.tally)

    def ready(self, now: float | None = None) -> bool:
        """Whether a batch is due: a full one, or (with ``now``) a partial one that waited.

        Args:
            now: ``time.monotonic()``; when given, a partial batch whose oldest label has
                waited ``spec.max_batch_wait_s`` is due too.
        """
        if self.rollout_verdict is not None:
            return True
        if not self.model.learning or not self.buffer:
            return False
        spec = self.model.spec
        trainable = self._trainable()
        if trainable >= spec.batch_size:
            return True
        return (
            trainable > 0
            and now is not None
            and spec.max_batch_wait_s > 0
            and now - self.buffer[0].received >= spec.max_batch_wait_s
        )

    def _trainable(self) -> int:
        """Examples in the buffer that would be trained on, counted up to a batch: the
        scan stops there, so a long buffer (paused, or during a rollout) costs no more."""
        policy = self.model.spec.policy
        if policy.holdout_fraction <= 0.0:
            return len(self.buffer)
        needed = self.model.spec.batch_size
        count = 0
        for example in self.buffer:
            if not in_holdout(policy, example.prediction_id):
                count += 1
                if count >= needed:
                    break
        return count

    def next_due(self) -> float | None:
        """When a partial batch becomes due (monotonic seconds), or None."""
        spec = self.model.spec
        if not self.model.learning or not self.buffer or spec.max_batch_wait_s <= 0:
            return None
        return self.buffer[0].received + spec.max_batch_wait_s

    def step(self, now: float | None = None) -> list[Any]:
        """Take one batch, gate the candidate step, and return the events that record it.

        Labels are consumed in log order until the batch is full; the holdout examples
        met on the way join the gate's window (recorded as ``holdout_ids``, never trained
        on). The replay buffer may mix earlier examples in. The candidate serves only if
        the gate accepts it (``UpdateApplied``); otherwise ``UpdateRejected`` records why
        and the served state stays. Then the drift detectors see the consumed examples;
        a detection is recorded and acted upon by policy.
        """
        if not self.ready(now):
            raise FailedPreconditionError("no batch is due, or learning is paused")
        if self.rollout_verdict is not None:
            return self._decide_rollout()
        spec = self.model.spec
        policy = spec.policy
        trained: list[LabeledExample] = []
        holdout: list[LabeledExample] = []
        # Replayed examples take their share of the batch's rows; new ones fill the rest.
        replayed = self.safety.replay.choose(int(self.state.step) + 1, spec.batch_size)
        quota = spec.batch_size - len(replayed)
        last = self.buffer[0].prediction_id
        while self.buffer and len(trained) < quota:
            example = self.buffer.popleft()
            (holdout if in_holdout(policy, example.prediction_id) else trained).append(example)
            last = example.prediction_id  # the learner resumes after the last one consumed
        x = np.asarray([*(e.features for e in trained), *(e.features for e in replayed)], dtype=np.float64)
        y = np.asarray([*(e.label for e in trained), *(e.label for e in replayed)], dtype=np.float64)
        ids = tuple(e.prediction_id for e in trained)
        holdout_ids = tuple(e.prediction_id for e in holdout)
        replayed_ids = tuple(e.prediction_id for e in replayed)
        candidate, metrics = self.learner.update_step(self.state, make_batch(spec, x, y))
        loss_before, loss_after, _, finite_flag = (float(v) for v in np.asarray(metrics["summary"]))
        finite = finite_flag == 1.0 and math.isfinite(loss_before) and math.isfinite(loss_after)
        self.safety.holdout.extend(e.as_example() for e in holdout)
        hx, hy = self.safety.holdout_arrays()
        verdict = evaluate_gate(spec, self.learner, self.state, candidate, finite, hx, hy, self.safety.anchor())
        extra: dict[str, Any] = {
            "holdout_ids": holdout_ids,
            "replayed_ids": replayed_ids,
            "through": last if last != ids[-1] else None,
            "gate": verdict.figures or None,
        }
        if verdict.accepted:
            digest = state_digest(candidate)
            self.model.apply_update(ids, int(candidate.step), loss_before, loss_after, digest, self.actor, **extra)
            self.state, self.digest = candidate, digest
        else:
            self.model.reject_update(ids, verdict.reason, loss_before, loss_after, self.actor, **extra)
        found = None
        if policy.stateful:  # the default policy keeps no windows: nothing to remember
            found = self.safety.after_update(
                [e.as_example() for e in trained], [e.as_example() for e in holdout], verdict.accepted, self.state
            )
        if found is not None:
            self._act_on_drift(found)
        return list(self.model.collect_events())

    def _decide_rollout(self) -> list[Any]:
        verdict, figures = self.rollout_verdict, self.tally.figures()
        self.rollout_verdict, self.tally = None, StageTally()
        if verdict == "advance":
            self.model.advance_rollout(figures, self.actor)
            if self.model.rollout is None:  # completed: the candidate is the head for good
                self.champion = None
        else:
            assert self.champion is not None
            state, digest = self.champion
            f = figures
            self.model.abort_rollout(
                f"canary loss {f['candidate_loss']:.4g} worse than control {f['control_loss']:.4g}",
                figures,
                digest,
                self.actor,
            )
            self.state, self.digest, self.champion = state, digest, None
        return list(self.model.collect_events())

    def _act_on_drift(self, found: Detection) -> None:
        policy = self.model.spec.policy
        self.detections.append(found)
        self.model.detect_drift(found.detector, found.at_prediction, found.figures, policy.drift_action, self.actor)
        if policy.drift_action == "pause":
            self.model.pause(f"drift detected by {found.detector}", self.actor)
        elif policy.drift_action == "rebaseline":
            self.rebaseline_recent(found)

    def predict(self, rows: np.ndarray) -> list[Scored]:
        """Scores and decisions for feature rows, from the live state."""
        proba = self.learner.predict_proba(self.state, rows)
        return [Scored(*decide(self.model.spec, p)) for p in proba]

    def rebaseline_recent(self, found: Detection | None, *, reason: str = "") -> None:
        """Re-fit from the initial state on the recent examples and start a rollout.

        After a detection, the examples are the ones ADWIN kept as the new regime (its
        window width), at least four batches; otherwise every recent example.
        """
        spec = self.model.spec
        recent = list(self.safety.recent)
        keep = len(recent)
        if found is not None and "window" in found.figures:
            keep = min(keep, max(int(found.figures["window"]), 4 * spec.batch_size))
        chosen = recent[len(recent) - keep :]
        if not chosen:
            self.model.pause("drift detected; nothing recent to rebaseline on", self.actor)
            return
        x = np.asarray([e.features for e in chosen], dtype=np.float64)
        y = np.asarray([e.label for e in chosen], dtype=np.float64)
        candidate = refit(spec, self.learner, x, y, spec.policy.rebaseline_epochs)
        digest = state_digest(candidate)
        why = reason or (f"drift detected by {found.detector}" if found is not None else "rebaseline")
        self.champion = (self.state, self.digest)
        self.model.rebaseline(
            tuple(e.prediction_id for e in chosen), spec.policy.rebaseline_epochs, 0.0, digest, why, self.actor
        )
        self.state, self.digest = candidate, digest

    def restore(self, ledger: Any, replayer: Any) -> None:
        """Rebuild the safety context (holdout window, detectors, replay pool) from the log.

        The same fold ``audit verify`` runs, without the JAX steps: the detectors and
        windows depend only on the recorded examples and verdicts.
        """
        from projections.replay import safety_context_at

        self.safety = safety_context_at(ledger, self.model, replayer)
        rollout = self.model.rollout
        if rollout is not None:
            champion = replayer.state_at(self.model.id, rollout.champion_version)
            self.champion = (champion.state, champion.digest)

    def reset_to(self, model: Model, state: LearnerState) -> None:
        """Adopt a new head (after a rollback or another writer's change)."""
        self.model = model
        self.state = state
        self.digest = state_digest(state)
