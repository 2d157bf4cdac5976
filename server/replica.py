"""Serving replicas follow the log (invariant 8): fold committed model events into the catalog.

Every ``learnledger serve`` process runs one ``ReplicaFollower``. It tails the model
events any process commits (the ``learn`` worker's updates, an operator's rollback or
pause from the CLI or another server) and folds each into the served head the same way
replay does: an ``UpdateApplied`` re-runs the recorded batch with the same jitted step
and must reproduce the recorded digest before it is served; a ``RolledBack`` adopts
``Replayer.state_at(target)``. Versions only grow in the catalog, so the follower and
an in-process learner publishing the same version never fight; a gap (a version this
process never saw) reloads the head from snapshots plus the log.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from uuid import UUID

import numpy as np

from domain.errors import LedgerError
from domain.ledger import MODEL_REGISTERED_TOPIC
from domain.model import Model
from domain.prediction import Prediction
from projections.digest import state_digest
from projections.learners import make_batch
from projections.replay import examples_for
from server.catalog import ModelCatalog, ServedModel
from server.learning_steps import MODEL_CHANGE_TOPICS
from server.log_follower import POLL_INTERVAL_S, LogFollower
from server.services import LedgerService

log = logging.getLogger(__name__)

# Events after which what serves is re-read from the log rather than stepped.
_RELOAD_ON = (Model.Rebaselined, Model.RolloutAdvanced, Model.RolloutAborted, Model.RolloutCompleted)

FAILURE_BACKOFF_S = 1.0


class ReplicaFollower:
    """One thread that keeps this process's ``ModelCatalog`` at the log's head.

    Attributes:
        loads_from_snapshot: heads loaded from a parameter snapshot (plus the events after it).
        loads_from_genesis: heads loaded by folding from registration.
        events_folded: model events folded incrementally from the log.
    """

    def __init__(self, service: LedgerService, catalog: ModelCatalog, *, poll_interval_s: float = POLL_INTERVAL_S):
        self.service = service
        self.ledger = service.ledger
        self.catalog = catalog
        self.poll_interval_s = poll_interval_s
        self.loads_from_snapshot = 0
        self.loads_from_genesis = 0
        self.events_folded = 0
        self.caught_up = threading.Event()
        self._names: dict[UUID, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-follower", daemon=True)

    def start(self, ready_timeout_s: float = 120.0) -> None:
        """Start following; return once every model's head is loaded and compiled.

        A replica should not take traffic before it serves the log's head: its first
        replies would carry an old version, and its first fold would wait for XLA.
        """
        self._thread.start()
        if not self.caught_up.wait(ready_timeout_s):
            log.warning("replica: heads not loaded after %.0f s; taking traffic anyway", ready_timeout_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception:
                log.exception("replica follower failed; restarting from the head")
                self._stop.wait(FAILURE_BACKOFF_S)

    def _follow(self) -> None:
        # Position first, heads second: an event committed in between is then both in
        # the loaded head and read from the log, and the version check skips it.
        start = self.ledger.recorder.max_notification_id() or 0
        topics = (MODEL_REGISTERED_TOPIC, *MODEL_CHANGE_TOPICS)
        with LogFollower(self.ledger, topics, after=start, poll_interval_s=self.poll_interval_s) as f:
            for model in self.ledger.list_models():
                served = self.catalog.peek(model.name)
                if served is not None and served.version >= model.version:
                    self._names[model.id] = model.name  # this process's learner loaded it
                else:
                    self._load(model)
            self.caught_up.set()
            while not self._stop.is_set():
                page = f.read_page()
                if page:
                    self._fold_page([event for _, event in page])
                if len(page) < f.page_size:
                    f.wait()

    def _load(self, model: Model) -> ServedModel:
        """Load a head (newest snapshot ≤ head, then fold) and say which way it came."""
        store = self.service.store
        snap = store.get_snapshot(model.id, model.version) if store is not None else None
        served = self.catalog.load(model)
        self._names[model.id] = model.name
        # Compile the step now: the first update to fold would otherwise wait for XLA
        # (seconds), and the replica would serve a stale version all that time.
        empty = make_batch(model.spec, np.zeros((0, model.spec.n_features)), np.zeros((0,)))
        np.asarray(served.learner.update_step(served.state, empty)[1]["summary"])
        if snap is not None:
            self.loads_from_snapshot += 1
            source = f"from snapshot at version {snap.version} + {model.version - snap.version} events"
        else:
            self.loads_from_genesis += 1
            source = f"from genesis ({model.version} events)"
        log.info("replica: model %s serves version %d, loaded %s", model.name, served.version, source)
        return served

    def _fold_page(self, events: list[Any]) -> None:
        # One read of the predictions of the updates this process does not serve yet. With
        # the learner in process, every update is published before the follower sees it:
        # reading its batch back cost ~4 % of a busy server's CPU for nothing.
        ids = [
            pid
            for e in events
            if isinstance(e, Model.UpdateApplied) and self._unserved(e)
            for pid in (*e.prediction_ids, *e.replayed_ids)
        ]
        known = self.ledger.get_predictions(ids) if ids else {}
        for event in events:
            self._fold(event, known)

    def _unserved(self, event: Any) -> bool:
        name = self._names.get(event.originator_id)
        served = self.catalog.peek(name) if name is not None else None
        return served is None or event.originator_version > served.version

    def _fold(self, event: Any, known: dict[UUID, Prediction]) -> None:
        if isinstance(event, Model.Registered):
            # Load (and compile) new models before their first prediction or update.
            if self.catalog.peek(event.name) is None:
                self._load(self.ledger.get_model_by_id(event.originator_id))
            return
        name = self._names.get(event.originator_id)
        if name is None:  # registered after this process started
            name = self._names[event.originator_id] = self.ledger.get_model_by_id(event.originator_id).name
        served = self.catalog.peek(name)
        if served is None:
            return  # not served here yet: its first use loads the head from the log
        version = event.originator_version
        if version <= served.version:
            return  # published already (by this process's own learner, or a reload)
        if version != served.version + 1 or served.candidate is not None or isinstance(event, _RELOAD_ON):
            # A gap, or a rollout event (two states serve): fold the whole picture afresh.
            self._load(self.ledger.get_model_by_id(served.model_id))
            return
        try:
            state, digest, paused = self._next(served, event, known)
        except LedgerError as exc:
            # Never serve a state the log does not certify; keep serving the last good one.
            log.error("replica: model %s version %d cannot be folded: %s", served.name, version, exc)
            return
        self.catalog.publish(ServedModel(served.model_id, served.name, served.spec, version, digest, state, paused))
        self.events_folded += 1

    def _next(self, served: ServedModel, event: Any, known: dict[UUID, Prediction]) -> tuple[Any, str, bool]:
        """The state, digest and paused flag after ``event`` (one step of replay's fold)."""
        from projections.replay import ReplayError

        match event:
            case Model.UpdateApplied(prediction_ids=ids, replayed_ids=replayed):
                x, y = examples_for(self.ledger, served.model_id, served.spec, (*ids, *replayed), known)
                state, _ = served.learner.update_step(served.state, make_batch(served.spec, x, y))
                digest = state_digest(state)
            case Model.RolledBack(to_version=target):
                folded = self.service.replayer.state_at(served.model_id, target)
                state, digest = folded.state, folded.digest
            case Model.Paused():
                return served.state, served.digest, True
            case Model.Resumed():
                return served.state, served.digest, False
            case _:  # UpdateRejected, DriftDetected: the served state did not change
                return served.state, served.digest, served.paused
        if digest != event.digest:
            raise ReplayError(f"replayed digest {digest} differs from recorded {event.digest}")
        return state, digest, served.paused
