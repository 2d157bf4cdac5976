"""One led model's exactly-once learner, as a turn of work for shared worker threads.

``learnledger learn`` leads many models with a few threads (``server.worker_pool``). What
it knows of one model lives in a ``ModelSlot``: the learner, how far into the log that
model's labels were handed over (``position``), and an inbox the process's one log
reader fills. ``ModelRunner.run`` is one turn: take the inbox, step while a batch is due
(at most ``MAX_STEPS_PER_COMMIT``, so a backlog never monopolises a worker), commit, and
only then let the reader hand over more. Whatever goes wrong with a commit — an
operator's rollback or pause took the version (``ConcurrencyError``), the database went
away, the process died — the recovery is the same as ever: reload the model from the
log (``load_learner``), and re-read the labels after the one of ``learned_through``.
Batches are a pure function of the log, so the history comes out the same whenever and
wherever the learner dies.

Re-reading comes from memory when it can: a slot keeps a ``Journal`` of the events it
was handed since its last commit, so a reload replays them instead of making the
process's one log reader rewind (which re-reads and re-decodes the log for every model
it leads). Only a reload from before what the journal holds (the first load, a
rollback, a journal bounded out) rewinds the reader.

Any other exception (a learner that cannot be built, a step that raises) fails only
this model: it is logged, reported, and retried after an exponential backoff, while the
other models keep their turns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from domain.errors import LedgerError
from domain.model import Model
from projections.learning import ModelLearner
from server.journal import Journal
from server.learning_steps import drain, examples, learnable, load_learner, resume_position, save_snapshots
from server.services import LedgerService

log = logging.getLogger(__name__)

# Catching up on a backlog: commit every this many steps, so that progress (and the
# freshness of what replicas serve) never waits for a whole page to be learned, and
# other models get their turn in between.
MAX_STEPS_PER_COMMIT = 32
READ_AHEAD = 2000  # labels buffered per model before the reader stops handing it more
# Events a journal keeps at most: the inbox and the learner's buffer (each bounded by
# READ_AHEAD), so only a model that takes no batch for long (paused, or getting late
# labels only) bounds it out — its next reload then rewinds the reader, as before.
JOURNAL_LIMIT = 2 * READ_AHEAD
BACKOFF_S = 0.5  # first retry of a failed model; doubles per consecutive failure
MAX_BACKOFF_S = 30.0
# Test hooks (environment, read once by ``learn``): sleep this long between computing a
# step and committing it, so that a crash test's kills land in that window too; and make
# the step of these models (comma-separated names) raise, a stand-in for a poisoned stream.
COMMIT_DELAY_VAR = "LEARNLEDGER_TEST_COMMIT_DELAY_S"
FAULT_MODELS_VAR = "LEARNLEDGER_FAULT_MODEL"

Report = Callable[[dict[str, Any]], None]


class LostLeadership(Exception):
    """This process no longer holds the model's lock: stop before committing anything."""


class InjectedFault(RuntimeError):
    """Raised by the ``LEARNLEDGER_FAULT_MODEL`` test hook in place of a real step."""


@dataclass(eq=False)
class ModelSlot:
    """This process's lease on one model it leads.

    ``lock`` guards what the reader and the workers share: ``inbox``, ``journal``,
    ``position`` and ``buffered``. The invariants the reader keeps: the journal holds
    exactly the log's events for this model in ``(journal.base, position]``, and — while
    the model learns — its learner's buffer plus the inbox hold those after its resume
    position.
    """

    model_id: UUID
    lock: threading.Lock = field(default_factory=threading.Lock)
    inbox: list[tuple[int, Any]] = field(default_factory=list)
    # None until the first load sets where its unlearned labels start: the reader hands
    # this model nothing, and does not rewind for it, before.
    position: int | None = None
    buffered: int = 0
    journal: Journal = field(default_factory=lambda: Journal(JOURNAL_LIMIT))
    learner: ModelLearner | None = None
    # Failed, waiting for its retry: the reader still hands it events (into the journal,
    # for the reload to replay), but only the retry timer wakes it.
    backing_off: bool = False
    # Labels were dropped while the model was not learning: reload before it learns again.
    stale: bool = False
    revoked: bool = False
    # Being handed over to another process: its current turn commits, then it is dropped.
    retiring: bool = False
    announced: bool = False
    failures: int = 0
    # Scheduling (owned by the pool, under its condition).
    queued: bool = False
    running: bool = False
    again: bool = False
    wake_at: float | None = None

    def full(self) -> bool:
        """Whether it has enough queued to learn from without reading further ahead.

        A model backing off learns nothing until its retry: it stops at READ_AHEAD
        events in its journal (a learning model's journal is trimmed by its commits,
        and a paused one's bounded by ``JOURNAL_LIMIT``).
        """
        queued = len(self.inbox) + self.buffered
        return queued >= READ_AHEAD or (self.backing_off and len(self.journal) >= READ_AHEAD)

    def accept(self, after: int, events: list[tuple[int, Any]], last: int) -> bool:
        """Take a page the reader read after log position ``after``, if it continues this
        model's view of the log; ``events`` are this model's, ``last`` the page's end.

        Returns whether anything was added to the inbox.
        """
        with self.lock:
            position = self.position
            if position is None or self.revoked or position < after or self.full():
                return False  # loading, or the page starts beyond what it has seen
            new = [item for item in events if item[0] > position]
            self.position = max(position, last)
            self.journal.extend(new)
            if self.backing_off:
                return False  # its reload replays the journal; waking it would cut the backoff short
            self.inbox.extend(new)
            return bool(new)


class ModelRunner:
    """Takes turns for slots: load, absorb the inbox, step, commit (thread-safe per slot)."""

    def __init__(
        self,
        service: LedgerService,
        *,
        report: Report,
        rewound: Callable[[], None],
        commit_delay_s: float = 0.0,
        fault_models: frozenset[str] = frozenset(),
        on_commit: Callable[[list[Any]], None] | None = None,
    ):
        self.service = service
        self.on_commit = on_commit  # e.g. alerts on drift and rollout events, after they committed
        self.ledger = service.ledger
        self.report = report
        self.rewound = rewound  # tells the reader a slot wants the log from further back
        self.commit_delay_s = commit_delay_s
        self.fault_models = fault_models
        self.updates_committed = 0
        self.failures = 0
        self._count = threading.Lock()

    def run(self, slot: ModelSlot) -> float | None:
        """One turn for ``slot``; returns when to run it again (monotonic), None if only
        new log events should wake it.

        Raises:
            LostLeadership: the lock was lost; nothing of this turn committed.
        """
        learner = slot.learner if slot.learner is not None else self._load(slot)
        with slot.lock:
            items, slot.inbox = slot.inbox, []
        labels = []
        for _position, event in items:
            if isinstance(event, Model.Event):
                if event.originator_version > learner.version:
                    # An operator's rollback/pause/resume (or a previous leader's commit we
                    # did not know of): reload, and resume after the reloaded position.
                    self._load(slot)
                    return time.monotonic()
            elif learnable(event, slot.model_id):
                labels.append(event)
        now = time.monotonic()
        if not learner.model.learning:
            # Paused or in a rollout: keep nothing (the inbox would grow without bound);
            # whatever makes it learn again is a model event, and a reload resumes.
            slot.stale = slot.stale or bool(labels or learner.buffer)
            learner.buffer.clear()
        elif slot.stale:
            self._load(slot)
            return now
        else:
            learner.buffer.extend(examples(self.ledger, labels, now))
        if learner.model.learning and learner.ready(now):
            if learner.model.name in self.fault_models:
                raise InjectedFault(f"{FAULT_MODELS_VAR} fails model {learner.model.name!r}")
            self._step_and_commit(slot, learner, now)
            if slot.learner is not learner:
                # A refused commit reloaded it: its inbox now holds what its journal
                # replays, and only a turn absorbs that (no new event may come to wake it).
                return time.monotonic()
        with slot.lock:
            slot.buffered = len(learner.buffer)
        if learner.ready(time.monotonic()):
            return time.monotonic()
        return learner.next_due()

    def failed(self, slot: ModelSlot, exc: BaseException) -> float:
        """Forget ``slot``'s learner after ``exc`` and return when to retry (backoff)."""
        slot.failures += 1
        with self._count:
            self.failures += 1
        delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (slot.failures - 1))
        name = slot.learner.model.name if slot.learner is not None else str(slot.model_id)
        log.error(
            "learner of model %s failed (%d in a row); retrying in %.1f s", name, slot.failures, delay, exc_info=exc
        )
        with slot.lock:
            # The journal and position stay: the reload resumes from them, not the log.
            slot.learner, slot.inbox, slot.buffered, slot.backing_off = None, [], 0, True
        self.report(
            {
                "event": "failed",
                "model_id": str(slot.model_id),
                "error": f"{type(exc).__name__}: {exc}",
                "retry_s": delay,
            }
        )
        return time.monotonic() + delay

    def _step_and_commit(self, slot: ModelSlot, learner: ModelLearner, now: float) -> None:
        events, snapshots = drain(learner, self.service.snapshot_interval, now, max_steps=MAX_STEPS_PER_COMMIT)
        if not events:
            return
        if self.commit_delay_s:
            time.sleep(self.commit_delay_s)
        if slot.revoked:
            raise LostLeadership(str(slot.model_id))
        try:
            self.ledger.record(events)
        except LedgerError:
            # A rollback or pause (or another leader) took the version: nothing of this
            # drain is learned unless it committed, and the log says which.
            self._load(slot)
            return
        # Any other error (the database went away) fails the turn: the model is reloaded
        # after a backoff, and a commit that did happen shows up in ``learned_through``.
        slot.failures = 0
        with slot.lock:
            slot.journal.trim_through(learner.model.learned_through)
        if self.on_commit is not None:
            self.on_commit(events)
        with self._count:
            self.updates_committed += sum(isinstance(e, Model.UpdateApplied) for e in events)
        save_snapshots(self.service.store, slot.model_id, snapshots)

    def _load(self, slot: ModelSlot) -> ModelLearner:
        """Reload the head and its state from the log; its unlearned events come from the
        slot's journal if it holds them all, else the reader re-reads them."""
        with slot.lock:
            # The reader keeps handing it events meanwhile (into the journal): whatever
            # commits while this loads is then either in the head or after the position.
            slot.inbox, slot.buffered = [], 0
        learner = load_learner(self.ledger, self.service.replayer, slot.model_id)
        position = resume_position(self.ledger, learner.model)
        with slot.lock:
            replayed = _resume(slot, position)
            slot.learner, slot.stale, slot.backing_off = learner, False, False
        if not replayed:
            self.rewound()
        model = learner.model
        log.info(
            "model %s: resumed at version %d after log position %d (%s)%s",
            model.name,
            model.version,
            position,
            "from its journal" if replayed else "re-reading the log",
            "" if model.learning else " (not learning)",
        )
        if not slot.announced:
            slot.announced = True
            self.report(
                {
                    "event": "leading",
                    "model": model.name,
                    "model_id": str(slot.model_id),
                    "version": learner.version,
                    "position": position,
                }
            )
        return learner


def _resume(slot: ModelSlot, position: int) -> bool:
    """Make the inbox the model's events after ``position`` (under ``slot.lock``); returns
    whether the journal held them all, else the reader must rewind to ``position``."""
    handed = slot.position
    replay = slot.journal.resume_from(position) if handed is not None else None
    if handed is None or replay is None:
        slot.journal.reset(position)
        slot.position, slot.inbox = position, []
        return False
    slot.inbox = replay
    if position > handed:  # another leader learned beyond what was handed over here
        slot.journal.reset(position)
        slot.position = position
    return True
