"""The ``Model`` aggregate: one per model; its version is the model version."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import FailedPreconditionError, InvalidArgumentError, ModelPausedError
from domain.spec import LearnerSpec
from domain.validation import require_finite

MODEL_NAMESPACE = uuid5(NAMESPACE_URL, "learnledger:model")
MAX_NAME_LENGTH = 200


def model_id_for(name: str) -> UUID:
    """The model's aggregate id: uuid5 of its name, so a name maps to one stream."""
    return uuid5(MODEL_NAMESPACE, name)


@dataclass(frozen=True)
class Rollout:
    """A candidate version serving a share of traffic beside the champion."""

    candidate_version: int
    champion_version: int
    stage: int
    fraction: float


def validate_model_name(name: str) -> None:
    """Raise ``InvalidArgumentError`` unless ``name`` is a usable model name."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidArgumentError(f"model name must be 1 to {MAX_NAME_LENGTH} characters")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidArgumentError(f"model name {name!r} may contain only letters, digits, '-', '_' and '.'")


class Model(Aggregate):
    """A learned model's decision history.

    Events record decisions (spec, batch membership and order, verdicts, rollbacks);
    parameters are never stored, only their digests, and replay re-derives them.
    """

    class Registered(Aggregate.Created):
        """The model exists, with everything replay needs to build its initial state."""

        name: str
        spec: LearnerSpec
        platform: tuple[tuple[str, str], ...]
        initial_digest: str
        actor: str

    class UpdateApplied(Aggregate.Event):
        """One learner step was taken on exactly these labeled predictions, in order."""

        prediction_ids: tuple[UUID, ...]
        step: int
        loss_before: float
        loss_after: float
        digest: str
        actor: str
        # The holdout examples consumed with this batch (never trained on; the gate's
        # window is the tail of all of them), earlier examples mixed in by the replay
        # buffer (trained after the batch, in this order), the last prediction consumed
        # in log order, and the gate's figures.
        holdout_ids: tuple[UUID, ...] = ()
        replayed_ids: tuple[UUID, ...] = ()
        through: UUID | None = None
        gate: dict[str, float] | None = None

    class UpdateRejected(Aggregate.Event):
        """A candidate step was refused by the gate; the served state did not change."""

        prediction_ids: tuple[UUID, ...]
        reason: str
        loss_before: float
        loss_after: float
        actor: str
        holdout_ids: tuple[UUID, ...] = ()
        replayed_ids: tuple[UUID, ...] = ()
        through: UUID | None = None
        gate: dict[str, float] | None = None

    class DriftDetected(Aggregate.Event):
        """A drift detector fired on the examples of the preceding update event.

        ``at_prediction`` is the example at which it fired; replay feeds the detectors
        the same examples in the same order and must fire at the same one.
        """

        detector: str
        at_prediction: UUID
        figures: dict[str, float]
        action: str
        actor: str

    class Rebaselined(Aggregate.Event):
        """A full re-fit from the initial state on these examples (``epochs`` passes in
        this order); the result is a candidate that serves through the rollout."""

        prediction_ids: tuple[UUID, ...]
        epochs: int
        window_s: float
        digest: str
        reason: str
        actor: str

    class RolloutAdvanced(Aggregate.Event):
        """The candidate's canary loss held up; it now serves ``fraction`` of traffic."""

        stage: int
        fraction: float
        figures: dict[str, float]
        actor: str

    class RolloutAborted(Aggregate.Event):
        """The candidate lost to the champion; the champion's state is the head again."""

        to_version: int
        reason: str
        figures: dict[str, float]
        digest: str
        actor: str

    class RolloutCompleted(Aggregate.Event):
        """The candidate serves all traffic and learning continues from it."""

        to_version: int
        figures: dict[str, float]
        digest: str
        actor: str

    class RolledBack(Aggregate.Event):
        """The head state became the state of an earlier version; nothing was deleted."""

        to_version: int
        reason: str
        digest: str
        actor: str

    class Paused(Aggregate.Event):
        """Learning stopped; predictions keep being served."""

        reason: str
        actor: str

    class Resumed(Aggregate.Event):
        """Learning started again."""

        reason: str
        actor: str

    @event(Registered)
    def __init__(
        self,
        name: str,
        spec: LearnerSpec,
        platform: tuple[tuple[str, str], ...],
        initial_digest: str,
        actor: str,
    ) -> None:
        self.name = name
        self.spec = spec
        self.platform = platform
        self.digest = initial_digest
        self.paused = False
        self.steps = 0
        self.updates_applied = 0
        self.updates_rejected = 0
        self.rollbacks = 0
        self.learned_through: UUID | None = None
        self.pause_reason = ""
        self.drift_detections = 0
        self.last_drift: tuple[str, int] | None = None  # (detector, version)
        self.rebaselines = 0
        self.labels_consumed = 0  # labeled predictions taken by update events (trained + holdout)
        # The version whose state serves (all traffic, or the champion's share during a
        # rollout) and the rollout in progress, if any.
        self.serving_version = 1
        self.rollout: Rollout | None = None
        self._candidate_digest = ""

    @staticmethod
    def create_id(name: str, **_: Any) -> UUID:
        """Aggregate id from the model name."""
        return model_id_for(name)

    # --- commands: validate, then trigger ---------------------------------------------

    def apply_update(
        self,
        prediction_ids: tuple[UUID, ...],
        step: int,
        loss_before: float,
        loss_after: float,
        digest: str,
        actor: str,
        *,
        holdout_ids: tuple[UUID, ...] = (),
        replayed_ids: tuple[UUID, ...] = (),
        through: UUID | None = None,
        gate: dict[str, float] | None = None,
    ) -> None:
        """Record an accepted learner step.

        Raises:
            ModelPausedError: learning is paused, or a rollout is in progress.
            InvalidArgumentError: empty batch or repeated prediction ids.
        """
        self._check_can_learn(prediction_ids, holdout_ids)
        require_finite("loss_before", loss_before)
        require_finite("loss_after", loss_after)
        self._apply_update(
            prediction_ids, step, loss_before, loss_after, digest, actor, holdout_ids, replayed_ids, through, gate
        )

    def reject_update(
        self,
        prediction_ids: tuple[UUID, ...],
        reason: str,
        loss_before: float,
        loss_after: float,
        actor: str,
        *,
        holdout_ids: tuple[UUID, ...] = (),
        replayed_ids: tuple[UUID, ...] = (),
        through: UUID | None = None,
        gate: dict[str, float] | None = None,
    ) -> None:
        """Record a refused learner step (non-finite losses are recorded as -1)."""
        self._check_can_learn(prediction_ids, holdout_ids)
        self._reject_update(
            prediction_ids,
            reason,
            _finite_or_sentinel(loss_before),
            _finite_or_sentinel(loss_after),
            actor,
            holdout_ids,
            replayed_ids,
            through,
            _finite_figures(gate) if gate is not None else None,
        )

    def detect_drift(
        self, detector: str, at_prediction: UUID, figures: dict[str, float], action: str, actor: str
    ) -> None:
        """Record a drift detection (the learner decides the action by policy)."""
        self._detect_drift(detector, at_prediction, _finite_figures(figures), action, actor)

    def rebaseline(
        self, prediction_ids: tuple[UUID, ...], epochs: int, window_s: float, digest: str, reason: str, actor: str
    ) -> None:
        """Record a re-fit candidate; it starts serving at the first rollout stage.

        Raises:
            FailedPreconditionError: a rollout is already in progress.
            InvalidArgumentError: no examples, or repeated ones.
        """
        if self.rollout is not None:
            raise FailedPreconditionError(f"model {self.name!r} has a rollout in progress")
        if not prediction_ids:
            raise InvalidArgumentError("the rebaseline window holds no labeled examples")
        if len(set(prediction_ids)) != len(prediction_ids):
            raise InvalidArgumentError("a rebaseline may use each labeled prediction once")
        self._rebaseline(prediction_ids, epochs, window_s, digest, reason, actor)

    def advance_rollout(self, figures: dict[str, float], actor: str) -> None:
        """Move the candidate to the next stage of the policy (the last one completes)."""
        rollout = self._require_rollout()
        stages = self.spec.policy.rollout_stages
        if rollout.stage + 1 >= len(stages) - 1:
            self._complete_rollout(rollout.candidate_version, _finite_figures(figures), self._candidate_digest, actor)
        else:
            self._advance_rollout(rollout.stage + 1, stages[rollout.stage + 1], _finite_figures(figures), actor)

    def abort_rollout(self, reason: str, figures: dict[str, float], champion_digest: str, actor: str) -> None:
        """Stop the rollout; the champion's state becomes the head state again."""
        rollout = self._require_rollout()
        self._abort_rollout(rollout.champion_version, reason, _finite_figures(figures), champion_digest, actor)

    def _require_rollout(self) -> Rollout:
        if self.rollout is None:
            raise FailedPreconditionError(f"model {self.name!r} has no rollout in progress")
        return self.rollout

    def roll_back(self, to_version: int, target_digest: str, reason: str, actor: str) -> None:
        """Make an earlier version's state the head state.

        Raises:
            InvalidArgumentError: the target is not an earlier version, or no reason given.
        """
        if not 1 <= to_version < self.version:
            raise InvalidArgumentError(
                f"rollback target must be a version from 1 to {self.version - 1}, got {to_version}"
            )
        if not reason.strip():
            raise InvalidArgumentError("a rollback needs a reason")
        self._roll_back(to_version, reason, target_digest, actor)

    def pause(self, reason: str, actor: str) -> None:
        """Stop learning (serving goes on). Raises ``FailedPreconditionError`` if already paused."""
        if self.paused:
            raise FailedPreconditionError(f"model {self.name!r} is paused already")
        self._pause(reason, actor)

    def resume(self, reason: str, actor: str) -> None:
        """Start learning again. Raises ``FailedPreconditionError`` if not paused."""
        if not self.paused:
            raise FailedPreconditionError(f"model {self.name!r} is not paused")
        self._resume(reason, actor)

    def _check_can_learn(self, prediction_ids: tuple[UUID, ...], holdout_ids: tuple[UUID, ...] = ()) -> None:
        if self.paused:
            raise ModelPausedError(f"learning is paused for model {self.name!r}")
        if self.rollout is not None:
            raise ModelPausedError(f"learning waits for the rollout of model {self.name!r} to finish")
        if not prediction_ids:
            raise InvalidArgumentError("an update needs at least one labeled prediction")
        if len(set(prediction_ids) | set(holdout_ids)) != len(prediction_ids) + len(holdout_ids):
            raise InvalidArgumentError("an update may use each labeled prediction once")

    @property
    def learning(self) -> bool:
        """Whether the learner may take a step now (not paused, no rollout running)."""
        return not self.paused and self.rollout is None

    # --- event bodies: trivial assignments, re-run on every replay ---------------------

    def _next_version(self) -> int:
        # An event body runs before the aggregate takes the event's version: the version
        # this event creates is the current one plus one.
        return int(self.version) + 1

    @event(UpdateApplied)
    def _apply_update(
        self,
        prediction_ids: tuple[UUID, ...],
        step: int,
        loss_before: float,
        loss_after: float,
        digest: str,
        actor: str,
        holdout_ids: tuple[UUID, ...] = (),
        replayed_ids: tuple[UUID, ...] = (),
        through: UUID | None = None,
        gate: dict[str, float] | None = None,
    ) -> None:
        self.steps = step
        self.digest = digest
        self.updates_applied += 1
        self.labels_consumed += len(prediction_ids) + len(holdout_ids)
        self.learned_through = through or prediction_ids[-1]
        self.serving_version = self._next_version()

    @event(UpdateRejected)
    def _reject_update(
        self,
        prediction_ids: tuple[UUID, ...],
        reason: str,
        loss_before: float,
        loss_after: float,
        actor: str,
        holdout_ids: tuple[UUID, ...] = (),
        replayed_ids: tuple[UUID, ...] = (),
        through: UUID | None = None,
        gate: dict[str, float] | None = None,
    ) -> None:
        self.updates_rejected += 1
        self.labels_consumed += len(prediction_ids) + len(holdout_ids)
        self.learned_through = through or prediction_ids[-1]
        self.serving_version = self._next_version()

    @event(RolledBack)
    def _roll_back(self, to_version: int, reason: str, digest: str, actor: str) -> None:
        self.digest = digest
        self.rollbacks += 1
        self.rollout = None  # a rollback ends any rollout: the target's state serves everything
        self.serving_version = self._next_version()

    @event(Paused)
    def _pause(self, reason: str, actor: str) -> None:
        self.paused = True
        self.pause_reason = reason
        self.serving_version = self._next_version() if self.rollout is None else self.serving_version

    @event(Resumed)
    def _resume(self, reason: str, actor: str) -> None:
        self.paused = False
        self.pause_reason = ""
        self.serving_version = self._next_version() if self.rollout is None else self.serving_version

    @event(DriftDetected)
    def _detect_drift(
        self, detector: str, at_prediction: UUID, figures: dict[str, float], action: str, actor: str
    ) -> None:
        self.drift_detections += 1
        self.last_drift = (detector, self._next_version())
        self.serving_version = self._next_version() if self.rollout is None else self.serving_version

    @event(Rebaselined)
    def _rebaseline(
        self, prediction_ids: tuple[UUID, ...], epochs: int, window_s: float, digest: str, reason: str, actor: str
    ) -> None:
        self.rebaselines += 1
        self._candidate_digest = digest
        self.digest = digest  # the fold's head state; the champion keeps serving most traffic
        self.rollout = Rollout(self._next_version(), self.serving_version, 0, self.spec.policy.rollout_stages[0])

    @event(RolloutAdvanced)
    def _advance_rollout(self, stage: int, fraction: float, figures: dict[str, float], actor: str) -> None:
        assert self.rollout is not None
        self.rollout = Rollout(self.rollout.candidate_version, self.rollout.champion_version, stage, fraction)

    @event(RolloutAborted)
    def _abort_rollout(self, to_version: int, reason: str, figures: dict[str, float], digest: str, actor: str) -> None:
        self.rollout = None
        self.digest = digest
        self.serving_version = self._next_version()

    @event(RolloutCompleted)
    def _complete_rollout(self, to_version: int, figures: dict[str, float], digest: str, actor: str) -> None:
        self.rollout = None
        self.digest = digest
        self.serving_version = self._next_version()


def _finite_or_sentinel(value: float) -> float:
    return value if math.isfinite(value) else -1.0


def _finite_figures(figures: dict[str, float]) -> dict[str, float]:
    # Events refuse NaN/inf; a figure that is not finite (a diverged candidate's loss) is
    # recorded as the sentinel -1 with the verdict saying why.
    return {k: float(_finite_or_sentinel(float(v))) for k, v in figures.items()}


# Events after which the learner state is what it was before (the fold's no-op rules):
# a refused update, a pause or resume, a detection, a rollout stage advancing, and a
# rollout completing (its candidate's state is the head state already).
STATE_KEEPING_EVENTS: tuple[type, ...] = (
    Model.UpdateRejected,
    Model.Paused,
    Model.Resumed,
    Model.DriftDetected,
    Model.RolloutAdvanced,
    Model.RolloutCompleted,
)
