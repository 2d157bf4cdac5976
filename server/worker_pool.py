"""Shared workers for ``learnledger learn``: a few threads, one log reader, many models.

A thread per model (and a lock connection and a log follower each) stopped scaling at a
portfolio of 100 models: 200+ PostgreSQL connections. Here a process leads any number of
models with:

- one ``LogDispatcher`` thread, which reads the log's label and model events once, in
  pages, and hands each led model the events that concern it (``ModelSlot.accept``).
  Models resume at different positions, so it reads from the smallest position any
  model still needs: a model that loads for the first time (or resumes from before
  what its slot kept, after a rollback) makes it rewind, and the others skip what they
  have seen; a model that reloads after a failure or an operator's pause replays its
  slot's journal instead (``server.model_worker``). A model with ``READ_AHEAD``
  labels queued is left out until it has learned some, so one slow model neither
  balloons memory nor holds the others back.
- a ``WorkerPool`` of N threads taking turns on models: a model is queued when its
  inbox gets events, when a partial batch falls due, or when a retry after a failure
  is due. Turns are FIFO and bounded (``MAX_STEPS_PER_COMMIT``), so every model with a
  due batch gets a worker within one round of the others' turns.

Which process leads which model is still decided by advisory locks (``server.election``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import defaultdict, deque
from typing import Any
from uuid import UUID

from domain.ledger import Ledger
from domain.model import Model
from server.learning_steps import LABEL_TOPICS
from server.log_follower import LogFollower
from server.model_worker import LostLeadership, ModelRunner, ModelSlot

log = logging.getLogger(__name__)

IDLE_CHECK_S = 0.5  # how often an idle worker looks at the stop flag
KICK_CHECK_S = 0.05  # how often a waiting reader looks for a slot that wants a rewind
READ_RETRY_S = 1.0


def model_topics() -> tuple[str, ...]:
    """Every ``Model`` event topic: any change by another writer (an operator's pause,
    rollback, rollout; another leader's commit) must reach the model's leader."""
    from eventsourcing.utils import get_topic

    classes = [c for c in vars(Model).values() if isinstance(c, type) and issubclass(c, Model.Event)]
    return tuple(sorted({get_topic(c) for c in classes}))


class WorkerPool:
    """N threads sharing the turns of every led model."""

    def __init__(self, runner: ModelRunner, workers: int, stop: threading.Event, *, reader_kick: threading.Event):
        self.runner = runner
        self.workers = workers
        self.stop = stop
        self.slots: dict[UUID, ModelSlot] = {}
        self._cv = threading.Condition()
        self._ready: deque[ModelSlot] = deque()
        self._timers: list[tuple[float, int, ModelSlot]] = []
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        # Set when a model wants the log from further back (it loaded) or has room for
        # more: the reader reads again at once instead of waiting for a NOTIFY.
        self.reader_kick = reader_kick

    # --- the coordinator's side -----------------------------------------------------

    def start(self) -> None:
        """Start the worker threads."""
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"learn-worker-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the workers to finish their current turn (after ``stop`` is set)."""
        with self._cv:
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def add(self, model_id: UUID) -> None:
        """Lead a model: its first turn loads it."""
        with self._cv:
            slot = self.slots[model_id] = ModelSlot(model_id)
            self._enqueue(slot)

    def hand_over(self, model_id: UUID) -> None:
        """Stop leading a model gracefully (another process is to lead it).

        A turn in progress still commits; the slot is dropped when it ends, and
        ``busy`` stops listing the model then: only after that may its lock go.
        """
        with self._cv:
            slot = self.slots.get(model_id)
            if slot is None:
                return
            if slot.running:
                slot.retiring = True
            else:
                slot.revoked = True  # a queued turn is skipped
                del self.slots[model_id]

    def revoke_all(self) -> list[UUID]:
        """Stop leading every model (the lock session broke); returns their ids.

        A turn in progress does not commit (``LostLeadership``); its slot is forgotten
        when the turn ends, so a model is never led twice by this process.
        """
        with self._cv:
            ids = list(self.slots)
            for slot in list(self.slots.values()):
                slot.revoked = True
                if not slot.running:
                    del self.slots[slot.model_id]
            return ids

    def led(self) -> frozenset[UUID]:
        """The models this process leads and has loaded (for the default-label sweeper)."""
        with self._cv:
            return frozenset(
                m for m, s in self.slots.items() if not (s.revoked or s.retiring) and s.learner is not None
            )

    def busy(self) -> frozenset[UUID]:
        """Models with a slot, led or still winding down: not to be acquired again yet."""
        with self._cv:
            return frozenset(self.slots)

    # --- the reader's side ----------------------------------------------------------

    def read_from(self) -> int | None:
        """The log position the reader must continue after: the least any model needs."""
        with self._cv:
            slots = list(self.slots.values())
        positions = []
        for slot in slots:
            with slot.lock:
                if slot.position is not None and not slot.revoked and not slot.full():
                    positions.append(slot.position)
        return min(positions) if positions else None

    def dispatch(self, after: int, page: list[tuple[int, Any]]) -> None:
        """Hand a page read after ``after`` to the models it concerns, and queue them."""
        if not page:
            return
        mine: defaultdict[UUID | None, list[tuple[int, Any]]] = defaultdict(list)
        for item in page:
            event = item[1]
            model_id = event.originator_id if isinstance(event, Model.Event) else getattr(event, "model_id", None)
            mine[model_id].append(item)
        last = page[-1][0]
        with self._cv:
            slots = list(self.slots.values())
        woken = [slot for slot in slots if slot.accept(after, mine.get(slot.model_id, []), last)]
        if woken:
            with self._cv:
                for slot in woken:
                    self._enqueue(slot)

    # --- the workers ----------------------------------------------------------------

    def _enqueue(self, slot: ModelSlot) -> None:
        # Under the condition. A running slot runs again right after its turn.
        if slot.running:
            slot.again = True
        elif not slot.queued:
            slot.queued = True
            self._ready.append(slot)
            self._cv.notify()

    def _next(self) -> ModelSlot | None:
        with self._cv:
            while not self.stop.is_set():
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    at, _, slot = heapq.heappop(self._timers)
                    if slot.wake_at == at and slot.model_id in self.slots:
                        slot.wake_at = None
                        self._enqueue(slot)
                if self._ready:
                    slot = self._ready.popleft()
                    slot.queued, slot.running = False, True
                    return slot
                wait = IDLE_CHECK_S if not self._timers else min(IDLE_CHECK_S, self._timers[0][0] - now)
                self._cv.wait(max(wait, 0.001))
        return None

    def _work(self) -> None:
        while (slot := self._next()) is not None:
            was_full = slot.full()
            wake: float | None = None
            failed = False
            try:
                if not slot.revoked:
                    wake = self.runner.run(slot)
            except LostLeadership:
                pass
            except Exception as exc:  # one model's failure must not stop the others
                wake, failed = self.runner.failed(slot, exc), True
            self._finish(slot, wake, backoff=failed)
            if was_full and not slot.full():
                self.reader_kick.set()

    def _finish(self, slot: ModelSlot, wake: float | None, *, backoff: bool = False) -> None:
        with self._cv:
            slot.running = False
            if slot.revoked or slot.retiring:
                slot.revoked = True
                self.slots.pop(slot.model_id, None)
                return
            if backoff:
                # Events that arrived during the failed turn must not cut the backoff short
                # (a failing model would then spin): only the retry timer wakes it.
                slot.again, slot.wake_at = False, None
            if slot.again or (wake is not None and wake <= time.monotonic()):
                slot.again = False
                self._enqueue(slot)
            elif wake is not None and (backoff or slot.wake_at is None or wake < slot.wake_at):
                slot.wake_at = wake
                heapq.heappush(self._timers, (wake, next(self._seq), slot))
                self._cv.notify()


class LogDispatcher:
    """The one reader of the log in a ``learn`` process (a thread)."""

    def __init__(self, ledger: Ledger, pool: WorkerPool, stop: threading.Event, *, poll_interval_s: float):
        self.ledger = ledger
        self.pool = pool
        self.stop = stop
        self.poll_interval_s = poll_interval_s
        self.kicked = pool.reader_kick
        # What the reader costs, for tests and the ``stopped`` event: pages read, how
        # often it went back for a model, and how many events it so read again.
        self.pages = 0
        self.rewinds = 0
        self.reread = 0
        self._furthest = self._next = 0

    def run(self) -> None:
        """Read and dispatch until ``stop``."""
        topics = (*LABEL_TOPICS, *model_topics())
        with LogFollower(self.ledger, topics, poll_interval_s=self.poll_interval_s) as follower:
            while not self.stop.is_set():
                self.kicked.clear()
                after = self.pool.read_from()
                if after is None:
                    self._wait(follower)
                    continue
                follower.seek(after)
                try:
                    page = follower.read_page()
                except Exception as exc:  # the database may be away: models keep their positions
                    log.warning("reading the log failed: %s", exc)
                    self.stop.wait(READ_RETRY_S)
                    continue
                self._count(after, page)
                self.pool.dispatch(after, page)
                if len(page) < follower.page_size:
                    self._wait(follower)

    def _count(self, after: int, page: list[tuple[int, Any]]) -> None:
        self.pages += 1
        if after < self._furthest:
            if after != self._next:  # went back (not: read on in the middle of a re-read)
                self.rewinds += 1
            self.reread += sum(1 for position, _ in page if position <= self._furthest)
        self._next = page[-1][0] if page else after
        self._furthest = max(self._furthest, self._next)

    def _wait(self, follower: LogFollower) -> None:
        # Until a commit (NOTIFY), a model's rewind, or the polling fallback.
        deadline = time.monotonic() + self.poll_interval_s
        while not self.stop.is_set() and not self.kicked.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or follower.wait(min(left, KICK_CHECK_S)):
                return
