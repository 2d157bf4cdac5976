"""Application services: domain use cases joined with the learner projections."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import numpy as np

from domain.errors import FailedPreconditionError, InvalidArgumentError, VersionNotFoundError
from domain.ledger import Ledger
from domain.model import Model
from domain.spec import LearnerSpec
from domain.validation import require_features
from projections.digest import state_digest, state_to_bytes
from projections.learners import decide, make_learner
from projections.learning import ModelLearner, Scored
from projections.platform import platform_fingerprint
from projections.rebaseline import refit
from projections.replay import FoldedState, Replayer, VerifyReport, examples_for
from projections.seals import SealReport, seal_log, verify_seals
from projections.store import LedgerRecorder

# A rebaseline records its example ids in one event: beyond this many it would be a
# very large event, and a re-fit on the newest this-many is the useful part anyway.
MAX_REBASELINE_EXAMPLES = 200_000


@dataclass(frozen=True)
class VersionRow:
    """One row of a model's history: what happened at that version."""

    version: int
    event: str
    time: datetime
    batch_size: int
    params_digest: str
    loss_before: float | None
    loss_after: float | None
    actor: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {
            "version": self.version,
            "event": self.event,
            "time": self.time.isoformat(),
            "batch_size": self.batch_size,
            "params_digest": self.params_digest,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "actor": self.actor,
            "detail": self.detail,
        }


class LedgerService:
    """The use cases the CLI and the gRPC servicers call."""

    def __init__(self, ledger: Ledger, *, snapshot_interval: int = 100):
        self.ledger = ledger
        self.snapshot_interval = snapshot_interval
        self.replayer = Replayer(ledger, snapshot_interval=snapshot_interval)
        self._learners: dict[UUID, ModelLearner] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> LedgerRecorder | None:
        """The PostgreSQL recorder, when the ledger runs on one (always, outside unit tests)."""
        return self.replayer.store

    # --- models ------------------------------------------------------------------------

    def register_model(self, name: str, spec: LearnerSpec, actor: str) -> Model:
        """Register a model with its initial-state digest and this platform's fingerprint."""
        learner = make_learner(spec)
        initial = learner.init()
        return self.ledger.register_model(
            name, spec, platform=platform_fingerprint(), initial_digest=state_digest(initial), actor=actor
        )

    def history(self, name: str) -> list[VersionRow]:
        """One row per model version, oldest first."""
        model = self.ledger.get_model(name)
        rows: list[VersionRow] = []
        digest = ""
        for event in self.ledger.get_model_events(model.id):
            # Pauses, resumes and rejected updates leave the parameters as they were.
            digest = getattr(event, "digest", None) or getattr(event, "initial_digest", None) or digest
            rows.append(_version_row(event, digest))
        return rows

    def state_at(self, name: str, *, version: int | None = None, at_time: datetime | None = None) -> FoldedState:
        """The learner state at a version, or the version in force at a time."""
        model = self.ledger.get_model(name)
        if at_time is not None:
            version = self.version_at_time(model, at_time)
        return self.replayer.state_at(model.id, version)

    def version_at_time(self, model: Model, at_time: datetime) -> int:
        """The newest version whose event was recorded at or before ``at_time``."""
        found = 0
        for event in self.ledger.get_model_events(model.id):
            if event.timestamp <= at_time:
                found = event.originator_version
            else:
                break
        if found == 0:
            raise VersionNotFoundError(f"model {model.name!r} did not exist at {at_time.isoformat()}")
        return found

    def score(self, folded: FoldedState, spec: LearnerSpec, features: list[float]) -> Scored:
        """Score one feature vector with a (historical) state."""
        row = np.asarray([require_features(features, spec.n_features, "model")], dtype=np.float64)
        proba = make_learner(spec).predict_proba(folded.state, row)
        return Scored(*decide(spec, proba[0]))

    def roll_back(self, name: str, to_version: int, reason: str, actor: str) -> Model:
        """Record a rollback, then make the live learner serve the target's state."""
        model = self.ledger.roll_back_model(name, to_version, reason, actor)
        with self._lock:
            live = self._learners.get(model.id)
            if live is not None:
                # The learner gets its own copy: it appends to the aggregate as it learns.
                live.reset_to(self.ledger.get_model(name), self.replayer.state_at(model.id, to_version).state)
        return model

    def rebaseline(self, name: str, window_s: float, reason: str, actor: str, *, epochs: int | None = None) -> Model:
        """Re-fit the model from its initial state on the examples it trained on in the last
        ``window_s`` seconds (log order, ``epochs`` passes) and start the candidate's rollout.

        Raises:
            InvalidArgumentError: no trained examples in the window, bad window or epochs.
            FailedPreconditionError: a rollout is in progress already.
        """
        if not window_s > 0:
            raise InvalidArgumentError(f"the window must be a positive duration, got {window_s} s")
        model = self.ledger.get_model(name)
        epochs = model.spec.policy.rebaseline_epochs if epochs is None else epochs
        if not 1 <= epochs <= 100:
            raise InvalidArgumentError(f"epochs must be between 1 and 100, got {epochs}")
        if model.rollout is not None:
            raise FailedPreconditionError(f"model {name!r} has a rollout in progress")
        cutoff = datetime.now(UTC) - timedelta(seconds=window_s)
        ids: tuple[UUID, ...] = tuple(
            dict.fromkeys(
                pid
                for e in self.ledger.get_model_events(model.id)
                if isinstance(e, (Model.UpdateApplied, Model.UpdateRejected)) and e.timestamp >= cutoff
                for pid in e.prediction_ids
            )
        )[-MAX_REBASELINE_EXAMPLES:]
        if not ids:
            raise InvalidArgumentError(f"model {name!r} trained on no examples in the last {window_s:g} s")
        x, y = examples_for(self.ledger, model.id, model.spec, ids)
        candidate = refit(model.spec, make_learner(model.spec), x, y, epochs)
        model = self.ledger.rebaseline_model(
            name,
            ids,
            epochs,
            window_s,
            state_digest(candidate),
            reason or "rebaseline",
            actor,
            at_version=model.version,
        )
        self._drop_live(model.id)
        return model

    def abort_rollout(self, name: str, reason: str, actor: str) -> Model:
        """Stop a rollout by hand; the champion serves everything again (recorded)."""
        model = self.ledger.abort_rollout_model(name, reason, actor)
        self._drop_live(model.id)
        return model

    def pause(self, name: str, reason: str, actor: str) -> Model:
        """Pause learning (recorded)."""
        model = self.ledger.pause_model(name, reason, actor)
        self._refresh_live(model)
        return model

    def resume(self, name: str, reason: str, actor: str) -> Model:
        """Resume learning (recorded)."""
        model = self.ledger.resume_model(name, reason, actor)
        self._refresh_live(model)
        return model

    def seal(self, actor: str) -> Any:
        """Seal the log positions written since the last seal (None when nothing new)."""
        return seal_log(self.ledger, actor=actor)

    def verify_seals(self) -> SealReport:
        """Check the seal chain and every sealed row."""
        return verify_seals(self.ledger)

    def verify(self, name: str | None = None) -> list[VerifyReport]:
        """Replay every model (or one) from genesis and compare every recorded digest."""
        models = [self.ledger.get_model(name)] if name else self.ledger.list_models()
        return [self.replayer.verify(m.id) for m in models]

    # --- live learners ---------------------------------------------------------------------

    def live_learner(self, name: str) -> ModelLearner:
        """The in-process learner serving a model's head state (built by replay once)."""
        model = self.ledger.get_model(name)
        with self._lock:
            live = self._learners.get(model.id)
            if live is None or live.version != model.version:
                from server.learning_steps import load_learner

                live = load_learner(self.ledger, self.replayer, model.id)
                live.warm_up()
                self._learners[model.id] = live
            return live

    def save_snapshot(self, model_id: UUID, version: int, learner: ModelLearner) -> None:
        """Cache the live state's parameters at ``version`` (after its event committed)."""
        if self.store is not None:
            self.store.put_snapshot(model_id, version, learner.digest, state_to_bytes(learner.state))

    def _refresh_live(self, model: Model) -> None:
        with self._lock:
            live = self._learners.get(model.id)
            if live is not None:
                live.model = self.ledger.get_model_by_id(model.id)

    def _drop_live(self, model_id: UUID) -> None:
        # The served states changed (a candidate, or the champion again): the next use
        # rebuilds the live learner from the log, champion and candidate included.
        with self._lock:
            self._learners.pop(model_id, None)


def _version_row(event: Any, digest: str) -> VersionRow:
    name = type(event).__name__
    ids = getattr(event, "prediction_ids", ())
    detail = ""
    if name == "RolledBack":
        detail = f"to version {event.to_version}: {event.reason}"
    elif name in ("Paused", "Resumed") or name == "UpdateRejected":
        detail = event.reason
    elif name == "Registered":
        detail = f"{event.spec.kind} learner, {event.spec.n_features} features"
    return VersionRow(
        version=event.originator_version,
        event=name,
        time=event.timestamp,
        batch_size=len(ids),
        params_digest=digest,
        loss_before=getattr(event, "loss_before", None),
        loss_after=getattr(event, "loss_after", None),
        actor=getattr(event, "actor", ""),
        detail=detail,
    )
