"""The in-process learner: committed labels in, update events out through the same writer.

Labels reach the loop only after they commit, in commit order (the writer's listener),
so the learner's buffer is exactly the log's order of accepted labels. Steps are taken
with the same jitted function replay uses; the update events go through the group
commit writer, and only once they commit is the new state served (invariant 1 for
models). On restart the loop re-derives the labels it had not learned yet from the log:
those committed after the Labeled event of ``Model.learned_through``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from domain.errors import LedgerError
from domain.prediction import Prediction
from projections.learning import LabeledExample, ModelLearner
from server.catalog import ModelCatalog, ServedModel, served_by
from server.learning_steps import ServedFacts, drain, load_learner, save_snapshots, served_facts
from server.log_reader import labeled_position, labels_after
from server.services import LedgerService
from server.writer import GroupCommitWriter

log = logging.getLogger(__name__)

FEATURE_CACHE_SIZE = 200_000
RELOAD_BACKOFF_S = 0.2


@dataclass(frozen=True)
class _Refresh:
    name: str
    done: Future[ServedModel]


_STOP = object()


class LearnerLoop:
    """One thread that owns every model's ``ModelLearner`` in this process."""

    def __init__(self, service: LedgerService, writer: GroupCommitWriter, catalog: ModelCatalog):
        self.service = service
        self.ledger = service.ledger
        self.writer = writer
        self.catalog = catalog
        self.learners: dict[UUID, ModelLearner] = {}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Features of recently committed predictions: labels usually follow soon, and
        # this saves the read of the Made event they need (features as used).
        # Keyed by the id's 128-bit int (UUID.__hash__ is Python code; this runs per event).
        # Served facts (features, score, decision) of recent predictions, by id.
        self._features: OrderedDict[int, ServedFacts] = OrderedDict()
        self._features_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="learner-loop", daemon=True)
        self.steps_committed = 0

    # --- lifecycle -------------------------------------------------------------------------

    def recover(self) -> int:
        """Load every model and re-derive its unlearned labels from the log; returns how many.

        Call before the server takes traffic and after the writer started: a full batch
        found here is learned (and committed) right away.
        """
        positions: dict[UUID, int] = {}
        for model in self.ledger.list_models():
            learner = self._load(model.id)
            through = learner.model.learned_through
            found = labeled_position(self.ledger, through) if through is not None else None
            positions[model.id] = found or 0
        if not positions:
            return 0
        recovered: list[Prediction.Labeled] = []
        for position, event in labels_after(self.ledger, min(positions.values())):
            if event.in_window and position > positions.get(event.model_id, position):
                recovered.append(event)
        self._add_labels(recovered)
        for model_id in list(self.learners):
            self._learn(model_id)
        log.info("learner loop recovered %d unlearned labels for %d models", len(recovered), len(positions))
        return len(recovered)

    def start(self) -> None:
        """Start the loop thread."""
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Learn from what has been committed so far, then stop (the writer must still run)."""
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- inputs ------------------------------------------------------------------------------

    def on_commit(self, events: Sequence[Any], _ids: Sequence[int]) -> None:
        """Writer listener: remember features of new predictions, queue accepted labels."""
        labels = []
        with self._features_lock:
            for event in events:
                if isinstance(event, Prediction.Made):
                    self._features[event.originator_id.int] = (
                        event.features,
                        event.score,
                        event.decision,
                        event.routing,
                    )
                elif isinstance(event, Prediction.Labeled) and event.in_window:
                    labels.append(event)
            while len(self._features) > FEATURE_CACHE_SIZE:
                self._features.popitem(last=False)
        if labels:
            self._queue.put(labels)

    def refresh(self, name: str) -> Future[ServedModel]:
        """Reload a model from the log after an operator command (rollback, pause, …)."""
        done: Future[ServedModel] = Future()
        self._queue.put(_Refresh(name, done))
        return done

    # --- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            labels: list[Prediction.Labeled] = []
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Refresh):
                    self._flush(labels)
                    labels = []
                    self._do_refresh(item)
                else:
                    labels.extend(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._flush(labels)
            if stop:
                return

    def _flush(self, labels: list[Prediction.Labeled]) -> None:
        if not labels:
            return
        touched = self._add_labels(labels)
        for model_id in touched:
            self._learn(model_id)

    def _do_refresh(self, item: _Refresh) -> None:
        try:
            model = self.ledger.get_model(item.name)
            learner = self.learners.get(model.id)
            saved = list(learner.buffer) if learner is not None else []
            item.done.set_result(self._reload(model.id, saved))
        except BaseException as exc:
            item.done.set_exception(exc)

    def _add_labels(self, labels: Sequence[Prediction.Labeled]) -> list[UUID]:
        with self._features_lock:
            pop = self._features.pop
            features = {e.originator_id.int: pop(e.originator_id.int, None) for e in labels}
        missing = [e.originator_id for e in labels if features[e.originator_id.int] is None]
        if missing:
            for pid, facts in served_facts(self.ledger, missing).items():
                features[pid.int] = facts
        touched: dict[UUID, None] = {}
        for event in labels:
            learner = self.learners.get(event.model_id) or self._load(event.model_id)
            found = features.get(event.originator_id.int)
            if found is None:  # cannot happen for a committed label; never learn a guess
                log.error("no features for labeled prediction %s; not learned", event.originator_id)
                continue
            learner.add(_example(event.originator_id, found, event.label))  # found: features, score, decision
            touched[event.model_id] = None
        return list(touched)

    def _learn(self, model_id: UUID) -> None:
        learner = self.learners[model_id]
        if not learner.ready():
            return
        saved = list(learner.buffer)
        events: list[Any] = []
        try:
            events, snapshots = drain(learner, self.service.snapshot_interval)
            self.writer.commit(events)
        except Exception as exc:
            # A rollback or pause committed first (ConcurrencyError), or the database is
            # away: nothing of this drain is served; reload from the log and keep the labels.
            if not isinstance(exc, LedgerError):
                log.warning("learner commit for model %s failed: %s", model_id, exc)
                time.sleep(RELOAD_BACKOFF_S)
            self._reload(model_id, saved)
            return
        self.steps_committed += len(events)
        self._publish(learner)
        save_snapshots(self.service.store, model_id, snapshots)

    # --- loading --------------------------------------------------------------------------------

    def _load(self, model_id: UUID) -> ModelLearner:
        learner = load_learner(self.ledger, self.service.replayer, model_id)
        learner.warm_up()
        self.learners[model_id] = learner
        self._publish(learner)
        return learner

    def _reload(self, model_id: UUID, saved: list[LabeledExample]) -> ServedModel:
        learner = self._load(model_id)
        through = learner.model.learned_through
        ids = [e.prediction_id for e in saved]
        if through in ids:
            # The "failed" commit did happen (e.g. the connection dropped after COMMIT).
            saved = saved[ids.index(through) + 1 :]
        learner.buffer = deque(saved)
        served = self.catalog.peek(learner.model.name)
        assert served is not None
        return served

    def _publish(self, learner: ModelLearner) -> None:
        self.catalog.publish(served_by(learner))


def _example(prediction_id: UUID, served: ServedFacts, label: float) -> LabeledExample:
    # Equal to LabeledExample(...) field for field, without the frozen dataclass's
    # __init__ (one object.__setattr__ per field: ~10% of this loop at 15k labels/s).
    example = object.__new__(LabeledExample)
    features, score, decision, routing = served
    example.__dict__.update(
        prediction_id=prediction_id,
        features=features,
        label=label,
        received=0.0,
        score=score,
        decision=decision,
        routing=routing,
    )
    return example
