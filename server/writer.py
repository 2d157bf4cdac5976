"""The group-commit writer: one thread owns ``ledger.record``; RPC threads wait on futures.

ARCHITECTURE.md invariant 2: the library serialises writers with an exclusive table
lock, so throughput comes from bigger transactions, never from more writers. Every
event the server appends goes through this one thread, which commits whatever is
queued as soon as it is free (an eager flush beat a fixed deadline by 1.38x) and only
then resolves the submitters' futures — so a reply is sent only after its event is
committed (invariant 1).

The writer thread does as little Python as possible, because every microsecond it
spends holding the GIL delays the next COPY: submitters encode their rows themselves
(``encode``) while the writer waits on the previous commit, and many small submissions
(unary predictions) are *built* together on the writer thread by one ``builder`` call
(one vectorised score for a whole transaction instead of one JAX dispatch per call).
"""

from __future__ import annotations

import _thread
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from domain.errors import ConcurrencyError
from domain.ledger import Ledger

log = logging.getLogger(__name__)

CommitListener = Callable[[Sequence[Any], Sequence[int]], None]
Row = tuple[Any, int, str, bytes]
MAX_BATCH_EVENTS = 1000


class WriterClosedError(Exception):
    """The writer is shutting down and takes no new submissions (maps to UNAVAILABLE)."""


class Ticket:
    """A one-shot result a submitter waits on: ``concurrent.futures.Future``'s waiting part.

    A bare lock, released once by the writer: a unary call's wait and wake-up cost no
    ``Condition``, ``RLock`` or callback list (measured: ``Future.__init__`` alone was
    ~7% of the server's Python time at 64 unary calls in flight).
    """

    __slots__ = ("_done", "_error", "_lock", "_value")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._value: list[int] = []
        self._error: BaseException | None = None
        self._done = False

    def done(self) -> bool:
        """Whether the outcome is known."""
        return self._done

    def cancelled(self) -> bool:
        """Tickets cannot be cancelled (the events commit regardless)."""
        return False

    def set_result(self, value: list[int]) -> None:
        """Resolve with the events' notification ids (once)."""
        self._value, self._done = value, True
        self._lock.release()

    def set_exception(self, error: BaseException) -> None:
        """Resolve with the reason the events did not commit (once)."""
        self._error, self._done = error, True
        self._lock.release()

    def result(self, timeout: float | None = None) -> list[int]:
        """Wait for the outcome: the notification ids, or raise why they did not commit."""
        if not self._done:
            if not self._lock.acquire(True, -1 if timeout is None else timeout):
                raise TimeoutError("the writer did not answer in time")
            self._lock.release()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class Submission:
    """Events that must commit together (one request), and the future its caller waits on.

    ``rows`` are the events already encoded by the submitter (None: the writer encodes
    them). A submission with a ``job`` has no events yet: the writer's ``builder``
    turns the jobs of one transaction into events and rows together, just before the
    COPY; ``size`` is then the number of events the job will make.

    ``contended``: the events' stream positions may be wanted by other submissions
    too (labels, predictions with idempotency keys). The writer then keeps two of
    them out of one transaction, and fails one whose position the previous
    transaction took without asking the database: a primary-key violation costs a
    rolled-back COPY per bisection step and burns notification ids.
    """

    events: list[Any]
    rows: list[Row] | None = None
    job: Any = None
    size: int = 0
    contended: bool = False
    future: Ticket = field(default_factory=Ticket)


@dataclass
class WriterStats:
    """Counters for logs and benchmarks."""

    transactions: int = 0
    events: int = 0
    submissions: int = 0
    split_retries: int = 0
    commit_seconds: float = 0.0


class GroupCommitWriter:
    """Commits many callers' events in few transactions, in submission order.

    A submission's events always commit in one transaction (a request is atomic); a
    transaction holds as many whole submissions as fit in ``max_events`` (a bigger
    submission goes alone). When a batch fails with ``ConcurrencyError`` (a duplicate
    prediction id, a racing label, a model change), the batch is bisected and retried so
    that only the offending submissions fail; their callers re-validate.
    """

    def __init__(self, ledger: Ledger, *, max_events: int = MAX_BATCH_EVENTS, name: str = "ledger-writer"):
        self.ledger = ledger
        self.max_events = max_events
        self.builder: Callable[[list[Submission]], None] | None = None
        # The ledger's own COPY recorder takes plain rows: encode them off the writer thread.
        self._takes_rows = ledger.encode_rows([]) is not None
        self.stats = WriterStats()
        self._queue: deque[Submission] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._listeners: list[CommitListener] = []
        # Metrics hook: (events, seconds) of every committed transaction (server.metrics).
        self.on_transaction: Callable[[int, float], None] | None = None
        self._last_keys: set[tuple[Any, int]] = set()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # Committed batches whose callers are still to be woken (see ``_wake``).
        self._acks: queue.SimpleQueue[tuple[list[Submission], list[int]] | None] = queue.SimpleQueue()
        self._acker = threading.Thread(target=self._wake, name=f"{name}-acks", daemon=True)

    def add_listener(self, listener: CommitListener) -> None:
        """Call ``listener(events, notification_ids)`` after every commit, in commit order.

        Listeners run on the writer thread, so they must only hand work off (enqueue).
        """
        self._listeners.append(listener)

    def start(self) -> None:
        """Start the writer thread."""
        self._acker.start()
        self._thread.start()

    def encode(self, events: Sequence[Any]) -> list[Row] | None:
        """The rows ``events`` will be stored as (None when the ledger's recorder takes no rows).

        Call on the submitting thread and pass the result to ``submit``, so that the
        writer thread only copies and commits.

        Raises:
            NonFiniteValueError: an event holds a NaN or infinity.
        """
        return self.ledger.encode_rows(events)

    def submit(self, events: Sequence[Any], rows: list[Row] | None = None, *, contended: bool = False) -> Ticket:
        """Queue events to commit together; the future resolves to their notification ids.

        Args:
            events: the events, in order.
            rows: ``encode(events)``, if the caller encoded them already.
            contended: other submissions may race for the same stream positions.

        Raises:
            WriterClosedError: the writer is closing.
        """
        submission = Submission(list(events), rows, size=len(events), contended=contended)
        if not submission.events:
            submission.future.set_result([])
            return submission.future
        return self._enqueue(submission)

    def submit_job(self, job: Any, size: int, *, contended: bool = False) -> Ticket:
        """Queue a job the ``builder`` turns into ``size`` events on the writer thread.

        Raises:
            WriterClosedError: the writer is closing.
        """
        if self.builder is None:
            raise RuntimeError("submit_job needs a builder")
        return self._enqueue(Submission([], job=job, size=size, contended=contended))

    def _enqueue(self, submission: Submission) -> Ticket:
        with self._cond:
            if self._closing:
                raise WriterClosedError("the server is shutting down; retry on another replica or later")
            self._queue.append(submission)
            self._cond.notify()
        return submission.future

    def commit(self, events: Sequence[Any], timeout: float | None = None) -> list[int]:
        """Submit and wait: returns only once the events are committed (or raises why not)."""
        return self.submit(events).result(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new submissions, commit everything queued, and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        # Only once the writer is gone: it may still hand over batches until then.
        if self._acker.is_alive() and not self._thread.is_alive():
            self._acks.put(None)  # after everything the writer handed over
            self._acker.join(timeout)

    @property
    def pending(self) -> int:
        """Submissions waiting for the writer."""
        return len(self._queue)

    # --- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue and self._closing:
                    return
                batch = self._take()
            self._commit(batch)

    def _take(self) -> list[Submission]:
        # Eager flush: take what is queued now, up to max_events, without waiting for more.
        batch = [self._queue.popleft()]
        size = batch[0].size
        while self._queue and size + self._queue[0].size <= self.max_events:
            submission = self._queue.popleft()
            size += submission.size
            batch.append(submission)
        return batch

    def _prepare(self, batch: list[Submission]) -> list[Submission]:
        """Build the jobs and encode what the submitters did not; drop (and fail) what cannot be."""
        jobs = [s for s in batch if s.job is not None and not s.events]
        if jobs:
            assert self.builder is not None
            try:
                self.builder(jobs)  # fills events and rows, or fails the job's future
            except Exception as exc:
                log.exception("building %d jobs failed", len(jobs))
                for s in jobs:
                    if not s.future.done():
                        _resolve(s.future, exc)
        kept = []
        for s in batch:
            if s.future.done() and not s.future.cancelled():
                continue  # failed while building
            if s.job is not None and not s.events:
                # A job that made no events (all its predictions existed already).
                _resolve(s.future, [])
                continue
            if s.rows is None and self._takes_rows:
                try:
                    s.rows = self.encode(s.events)
                except Exception as exc:  # one caller's bad event must not fail the others
                    _resolve(s.future, exc)
                    continue
            kept.append(s)
        return self._separate(kept) if any(s.contended for s in kept) else kept

    def _separate(self, batch: list[Submission]) -> list[Submission]:
        # Two contended submissions for one stream position: the later one waits for the
        # next transaction (where it fails fast below, and its caller re-validates).
        seen: set[tuple[Any, int]] = set()
        kept: list[Submission] = []
        later: list[Submission] = []
        for s in batch:
            if s.contended:
                keys = [(e.originator_id.int, e.originator_version) for e in s.events]
                if not self._last_keys.isdisjoint(keys):
                    _resolve(s.future, ConcurrencyError("a stream position was taken by the previous transaction"))
                    continue
                if not seen.isdisjoint(keys):
                    later.append(s)
                    continue
                seen.update(keys)
            kept.append(s)
        if later:
            with self._cond:
                self._queue.extendleft(reversed(later))
        return kept

    def _record(self, batch: list[Submission], events: list[Any]) -> list[int]:
        if not self._takes_rows:
            return self.ledger.record(events)
        return self.ledger.record_rows([r for s in batch for r in (s.rows or ())])

    def _commit(self, batch: list[Submission]) -> None:
        batch = self._prepare(batch)
        if not batch:
            return
        events = [e for s in batch for e in s.events]
        started = time.perf_counter()
        try:
            ids = self._record(batch, events)
        except ConcurrencyError as exc:
            if len(batch) == 1:
                _resolve(batch[0].future, exc)
                return
            # Bisect: one bad submission costs ~2·log2(n) transactions, not n.
            self.stats.split_retries += 1
            middle = len(batch) // 2
            self._commit(batch[:middle])
            self._commit(batch[middle:])
            return
        except Exception as exc:  # the database is gone: every waiting caller must hear it
            log.exception("group commit of %d events failed", len(events))
            for submission in batch:
                _resolve(submission.future, exc)
            return
        # UUID.__hash__ is Python code; the 128-bit int hashes in C.
        self._last_keys = {(e.originator_id.int, e.originator_version) for s in batch if s.contended for e in s.events}
        self.stats.transactions += 1
        self.stats.events += len(events)
        self.stats.submissions += len(batch)
        elapsed = time.perf_counter() - started
        self.stats.commit_seconds += elapsed
        if self.on_transaction is not None:
            try:
                self.on_transaction(len(events), elapsed)
            except Exception:  # a metrics failure must not leave the callers waiting
                log.exception("transaction observer failed")
        # Listeners first: the learner must see labels in commit order before any caller
        # that was acknowledged can submit something that depends on them.
        for listener in self._listeners:
            try:
                listener(events, ids)
            except Exception:
                log.exception("commit listener failed")
        # Committed (and the listeners ran): the callers may be told. Not here: waking
        # a parked RPC thread is a futex call made holding the GIL, and every woken thread
        # then asks for the GIL, which would be taken from this thread in the middle of
        # its next transaction; the acker thread wakes them while this thread waits for
        # PostgreSQL. One hand-off per transaction instead of one wake-up per caller on
        # the commit path. Order is kept: one FIFO, one acker.
        if self._acker.is_alive():
            self._acks.put((batch, ids))
        else:  # not started (a writer driven by hand) or already closed
            _ack(batch, ids)

    def _wake(self) -> None:
        """Acker thread: resolve committed batches' futures, in commit order, until ``None``."""
        while True:
            item = self._acks.get()
            if item is None:
                return
            try:
                _ack(*item)
            except Exception:  # never leave later callers waiting
                log.exception("resolving committed submissions failed")


def _ack(batch: list[Submission], ids: list[int]) -> None:
    offset = 0
    for submission in batch:
        n = len(submission.events)
        _resolve(submission.future, ids[offset : offset + n])
        offset += n


def _resolve(future: Ticket, outcome: list[int] | BaseException) -> None:
    # A caller that cancelled its future still had its events committed (requests are
    # never written partially); only the notification is dropped.
    if future.cancelled():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
