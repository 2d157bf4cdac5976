"""The group-commit writer: one thread owns ``ledger.record``; RPC threads wait on futures.

ARCHITECTURE.md invariant 2: the library serialises writers with an exclusive table
lock, so throughput comes from bigger transactions, never from more writers. Every
event the server appends goes through this one thread, which commits whatever is
queued as soon as it is free (an eager flush beat a fixed deadline by 1.38x) and only
then resolves the submitters' futures — so a reply is sent only after its event is
committed (invariant 1).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from domain.errors import ConcurrencyError
from domain.ledger import Ledger

log = logging.getLogger(__name__)

CommitListener = Callable[[Sequence[Any], Sequence[int]], None]
MAX_BATCH_EVENTS = 1000


class WriterClosedError(Exception):
    """The writer is shutting down and takes no new submissions (maps to UNAVAILABLE)."""


@dataclass
class Submission:
    """Events that must commit together (one request), and the future its caller waits on."""

    events: list[Any]
    future: Future[list[int]] = field(default_factory=Future)


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
        self.stats = WriterStats()
        self._queue: deque[Submission] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._listeners: list[CommitListener] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add_listener(self, listener: CommitListener) -> None:
        """Call ``listener(events, notification_ids)`` after every commit, in commit order.

        Listeners run on the writer thread, so they must only hand work off (enqueue).
        """
        self._listeners.append(listener)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def submit(self, events: Sequence[Any]) -> Future[list[int]]:
        """Queue events to commit together; the future resolves to their notification ids.

        Raises:
            WriterClosedError: the writer is closing.
        """
        submission = Submission(list(events))
        if not submission.events:
            submission.future.set_result([])
            return submission.future
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
        size = len(batch[0].events)
        while self._queue and size + len(self._queue[0].events) <= self.max_events:
            submission = self._queue.popleft()
            size += len(submission.events)
            batch.append(submission)
        return batch

    def _commit(self, batch: list[Submission]) -> None:
        events = [e for s in batch for e in s.events]
        started = time.perf_counter()
        try:
            ids = self.ledger.record(events)
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
        self.stats.transactions += 1
        self.stats.events += len(events)
        self.stats.submissions += len(batch)
        self.stats.commit_seconds += time.perf_counter() - started
        # Listeners first: the learner must see labels in commit order before any caller
        # that was acknowledged can submit something that depends on them.
        for listener in self._listeners:
            try:
                listener(events, ids)
            except Exception:
                log.exception("commit listener failed")
        offset = 0
        for submission in batch:
            n = len(submission.events)
            _resolve(submission.future, ids[offset : offset + n])
            offset += n


def _resolve(future: Future[list[int]], outcome: list[int] | BaseException) -> None:
    # A caller that cancelled its future still had its events committed (requests are
    # never written partially); only the notification is dropped.
    if future.cancelled():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
