"""The elected, exactly-once learner of one model, tailing the log (``learnledger learn``).

Life of a worker: wait for the model's advisory lock; once leading, load the head from
the log and resume after the label of ``Model.learned_through``; then follow labels in
log order, step when a batch is due (full, or partial after ``max_batch_wait_s``),
commit the update events, and only then read on. Whatever goes wrong with a commit — an
operator's rollback or pause took the version (``ConcurrencyError``), the database
went away, the process died — the recovery is the same: reload the model, rebuild the
state by replay, and re-read the labels after ``learned_through``. Batches are a pure
function of the log, so the history comes out the same whenever the learner dies.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from domain.errors import LedgerError
from domain.model import Model
from projections.learning import ModelLearner
from server.election import ModelLock
from server.learning_steps import (
    LABEL_TOPICS,
    MODEL_CHANGE_TOPICS,
    drain,
    examples,
    learnable,
    resume_position,
    save_snapshots,
)
from server.log_follower import POLL_INTERVAL_S, LogFollower
from server.services import LedgerService

log = logging.getLogger(__name__)

LOCK_RETRY_S = 0.5
LIVENESS_CHECK_S = 1.0
FAILURE_BACKOFF_S = 0.5
# Catching up on a backlog: commit every this many steps, so that progress (and the
# freshness of what replicas serve) never waits for a whole page to be learned.
MAX_STEPS_PER_COMMIT = 32
READ_AHEAD = 2000  # labels buffered before the next page is read
# Test hook: sleep this long between computing a step and committing it, so that a
# crash test's kills land in that window too.
COMMIT_DELAY_VAR = "LEARNLEDGER_TEST_COMMIT_DELAY_S"

Report = Callable[[dict[str, Any]], None]


class LostLeadership(Exception):
    """The lock's session broke: another learner may lead now; stop learning."""


class ModelWorker:
    """Runs one model's learner while this process holds its advisory lock."""

    def __init__(
        self,
        service: LedgerService,
        model_id: UUID,
        stop: threading.Event,
        *,
        report: Report | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ):
        self.service = service
        self.ledger = service.ledger
        self.model_id = model_id
        self.stop = stop
        self.report = report or (lambda _: None)
        self.poll_interval_s = poll_interval_s
        self.commit_delay_s = float(os.environ.get(COMMIT_DELAY_VAR, "0") or 0)
        self.leading = threading.Event()
        self.learner: ModelLearner | None = None
        self.updates_committed = 0
        self.resyncs = 0
        self._warmed = False

    # --- election ---------------------------------------------------------------------

    def run(self) -> None:
        """Wait for the lock, lead until stopped or the lock is lost, then wait again."""
        lock = ModelLock(self.ledger, self.model_id)
        self._prewarm()
        announced = False
        try:
            while not self.stop.is_set():
                if not lock.try_acquire():
                    if not announced:
                        self.report({"event": "standby", "model_id": str(self.model_id)})
                        announced = True
                    self.stop.wait(LOCK_RETRY_S)
                    continue
                announced = False
                self.leading.set()
                try:
                    self._lead(lock)
                except LostLeadership:
                    log.warning("lost the lock of model %s; waiting to be elected again", self.model_id)
                    self.report({"event": "lost", "model_id": str(self.model_id)})
                except Exception:
                    log.exception("learner of model %s failed; retrying", self.model_id)
                    self.stop.wait(FAILURE_BACKOFF_S)
                finally:
                    self.leading.clear()
        finally:
            lock.release()

    def _prewarm(self) -> None:
        # Compile the step and the scorer while waiting for the lock (jit caches by
        # shape, and the shapes are the spec's): a standby then takes over in a fraction
        # of a second instead of stalling learning behind XLA.
        try:
            model = self.ledger.get_model_by_id(self.model_id)
            from projections.learners import make_learner

            ModelLearner(model, make_learner(model.spec).init()).warm_up()
            self._warmed = True
        except Exception as exc:  # only a speed-up: the leader warms up anyway
            log.warning("could not pre-compile model %s's learner: %s", self.model_id, exc)

    # --- leading ----------------------------------------------------------------------

    def _lead(self, lock: ModelLock) -> None:
        with LogFollower(self.ledger, (*LABEL_TOPICS, *MODEL_CHANGE_TOPICS), poll_interval_s=self.poll_interval_s) as f:
            learner = self._resync(f)
            self.report(
                {
                    "event": "leading",
                    "model": learner.model.name,
                    "model_id": str(self.model_id),
                    "version": learner.version,
                    "position": f.position,
                }
            )
            checked = time.monotonic()
            while not self.stop.is_set():
                # Read ahead only so far (learning, not reading, is the backlog's limit),
                # but always while paused: the Resumed event must be seen.
                read = learner.model.paused or len(learner.buffer) < READ_AHEAD
                page = f.read_page() if read else []
                if page:
                    learner = self._absorb(page, f, learner)
                now = time.monotonic()
                if learner.ready(now):
                    learner = self._step_and_commit(learner, f, now)
                if now - checked >= LIVENESS_CHECK_S:
                    if not lock.alive():
                        raise LostLeadership(str(self.model_id))
                    checked = now
                if read and len(page) < f.page_size and not learner.ready(time.monotonic()):
                    # Caught up: sleep until a commit (NOTIFY), a partial batch is due, or
                    # the polling fallback.
                    due = learner.next_due()
                    timeout = self.poll_interval_s if due is None else max(0.0, due - time.monotonic())
                    f.wait(timeout)

    def _absorb(self, page: list[tuple[int, Any]], follower: LogFollower, learner: ModelLearner) -> ModelLearner:
        """Queue this model's learnable labels; on another writer's model event, resync."""
        labels = []
        for _position, event in page:
            if isinstance(event, Model.Event):
                if event.originator_id == self.model_id and event.originator_version > learner.version:
                    # An operator's rollback/pause/resume (or a previous leader's commit we
                    # did not know about): reload, and re-read the labels after the
                    # reloaded learned_through (this page's included).
                    return self._resync(follower)
            elif learnable(event, self.model_id):
                labels.append(event)
        learner.buffer.extend(examples(self.ledger, labels, time.monotonic()))
        return learner

    def _step_and_commit(self, learner: ModelLearner, follower: LogFollower, now: float) -> ModelLearner:
        events, snapshots = drain(learner, self.service.snapshot_interval, now, max_steps=MAX_STEPS_PER_COMMIT)
        if not events:
            return learner
        if self.commit_delay_s:
            time.sleep(self.commit_delay_s)
        try:
            self.ledger.record(events)
        except Exception as exc:
            # Nothing of this drain is learned unless it committed; the log decides.
            if not isinstance(exc, LedgerError):
                log.warning("commit of model %s's update failed: %s", self.model_id, exc)
                self.stop.wait(FAILURE_BACKOFF_S)
            return self._resync(follower)
        self.updates_committed += sum(isinstance(e, Model.UpdateApplied) for e in events)
        save_snapshots(self.service.store, self.model_id, snapshots)
        return learner

    def _resync(self, follower: LogFollower) -> ModelLearner:
        """Reload the head and its state from the log and re-read the unlearned labels."""
        model = self.ledger.get_model_by_id(self.model_id)
        folded = self.service.replayer.state_at(model.id, model.version)
        learner = ModelLearner(model, folded.state)
        if not self._warmed:
            learner.warm_up()
            self._warmed = True
        follower.seek(resume_position(self.ledger, model))
        self.learner = learner
        self.resyncs += 1
        log.info(
            "model %s: resumed at version %d after log position %d%s",
            model.name,
            model.version,
            follower.position,
            " (paused)" if model.paused else "",
        )
        return learner
