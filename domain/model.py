"""The ``Model`` aggregate: one per model; its version is the model version."""

from __future__ import annotations

import math
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

    class UpdateRejected(Aggregate.Event):
        """A candidate step was refused; the served state did not change."""

        prediction_ids: tuple[UUID, ...]
        reason: str
        loss_before: float
        loss_after: float
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
    ) -> None:
        """Record an accepted learner step.

        Raises:
            ModelPausedError: learning is paused.
            InvalidArgumentError: empty batch or repeated prediction ids.
        """
        self._check_can_learn(prediction_ids)
        require_finite("loss_before", loss_before)
        require_finite("loss_after", loss_after)
        self._apply_update(prediction_ids, step, loss_before, loss_after, digest, actor)

    def reject_update(
        self,
        prediction_ids: tuple[UUID, ...],
        reason: str,
        loss_before: float,
        loss_after: float,
        actor: str,
    ) -> None:
        """Record a refused learner step (non-finite losses are recorded as -1)."""
        self._check_can_learn(prediction_ids)
        self._reject_update(
            prediction_ids,
            reason,
            _finite_or_sentinel(loss_before),
            _finite_or_sentinel(loss_after),
            actor,
        )

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
        """Stop learning. Raises ``FailedPreconditionError`` if already paused."""
        if self.paused:
            raise FailedPreconditionError(f"model {self.name!r} is paused already")
        self._pause(reason, actor)

    def resume(self, reason: str, actor: str) -> None:
        """Start learning again. Raises ``FailedPreconditionError`` if not paused."""
        if not self.paused:
            raise FailedPreconditionError(f"model {self.name!r} is not paused")
        self._resume(reason, actor)

    def _check_can_learn(self, prediction_ids: tuple[UUID, ...]) -> None:
        if self.paused:
            raise ModelPausedError(f"learning is paused for model {self.name!r}")
        if not prediction_ids:
            raise InvalidArgumentError("an update needs at least one labeled prediction")
        if len(set(prediction_ids)) != len(prediction_ids):
            raise InvalidArgumentError("an update may use each labeled prediction once")

    # --- event bodies: trivial assignments, re-run on every replay ---------------------

    @event(UpdateApplied)
    def _apply_update(
        self,
        prediction_ids: tuple[UUID, ...],
        step: int,
        loss_before: float,
        loss_after: float,
        digest: str,
        actor: str,
    ) -> None:
        self.steps = step
        self.digest = digest
        self.updates_applied += 1
        self.learned_through = prediction_ids[-1]

    @event(UpdateRejected)
    def _reject_update(
        self,
        prediction_ids: tuple[UUID, ...],
        reason: str,
        loss_before: float,
        loss_after: float,
        actor: str,
    ) -> None:
        self.updates_rejected += 1
        self.learned_through = prediction_ids[-1]

    @event(RolledBack)
    def _roll_back(self, to_version: int, reason: str, digest: str, actor: str) -> None:
        self.digest = digest
        self.rollbacks += 1

    @event(Paused)
    def _pause(self, reason: str, actor: str) -> None:
        self.paused = True

    @event(Resumed)
    def _resume(self, reason: str, actor: str) -> None:
        self.paused = False


def _finite_or_sentinel(value: float) -> float:
    return value if math.isfinite(value) else -1.0
