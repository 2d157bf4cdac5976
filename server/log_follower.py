"""Tail the ledger's notification log: LISTEN/NOTIFY to wake, pages to read, polling as a net.

Readers in other processes (the ``learn`` worker, serving replicas) learn about new
events only from the log. The recorder NOTIFYs its channel in every insert transaction,
so a ``LISTEN`` wakes a follower within a millisecond of a commit; the library's own
subscription waits on it without a timeout (eventsourcing #305: a lost notification or
a dropped connection stalls it forever), so this follower never waits longer than
``poll_interval_s`` and re-reads the log whatever woke it. Notification ids are
gap-free in commit order (the recorder's exclusive table lock), so "everything after
position P" is a complete, ordered answer at any moment.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg.sql import SQL, Identifier

from domain.ledger import Ledger

log = logging.getLogger(__name__)

PAGE_SIZE = 1000  # pages >= 500: the library's default section size of 10 is 5x slower
POLL_INTERVAL_S = 0.5
RECONNECT_BACKOFF_S = 1.0


def connect_like(ledger: Ledger, **overrides: Any) -> psycopg.Connection[Any]:
    """A new autocommit connection with the ledger pool's parameters (not from the pool).

    LISTEN and session advisory locks belong to one session for its whole life, so they
    need a connection of their own that the pool can neither recycle nor share.
    """
    recorder: Any = ledger.recorder
    pool = recorder.datastore.pool
    kwargs = {k: v for k, v in dict(pool.kwargs or {}).items() if k != "row_factory"}
    kwargs.update(overrides)
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(pool.conninfo, autocommit=True, **kwargs)


class LogFollower:
    """Yields ``(position, event)`` for events of ``topics`` after a log position, in log order.

    Not thread-safe: one follower per reading thread. The position only moves past an
    event once it has been returned, and ``seek`` moves it back (re-reads are the
    caller's way to recover after a failed commit).
    """

    def __init__(
        self,
        ledger: Ledger,
        topics: Sequence[str],
        *,
        after: int = 0,
        page_size: int = PAGE_SIZE,
        poll_interval_s: float = POLL_INTERVAL_S,
        listen: bool = True,
    ):
        self.ledger = ledger
        self.topics = list(topics)
        self.position = after
        self.page_size = page_size
        self.poll_interval_s = poll_interval_s
        self.listen = listen
        self.wakeups = 0  # woken by NOTIFY (vs. polling timeouts): for tests and logs
        recorder: Any = ledger.recorder
        self.channel: str = recorder.channel_name
        self._conn: psycopg.Connection[Any] | None = None
        self._next_connect = 0.0

    # --- reading ----------------------------------------------------------------------

    def read(self) -> list[tuple[int, Any]]:
        """Everything committed after the position right now (several pages), decoded.

        Moves the position to the last event returned.
        """
        if self.listen:
            # LISTEN before reading: a commit between this read and the wait then
            # still wakes the wait instead of waiting out the poll interval.
            self._listening()
        out: list[tuple[int, Any]] = []
        while True:
            page = self.ledger.recorder.select_notifications(self.position + 1, self.page_size, topics=self.topics)
            to_domain_event = self.ledger.mapper.to_domain_event
            out.extend((n.id, to_domain_event(n)) for n in page)
            if page:
                self.position = page[-1].id
            if len(page) < self.page_size:
                return out

    def read_page(self) -> list[tuple[int, Any]]:
        """At most one page after the position (bounded work per call), decoded."""
        if self.listen:
            self._listening()  # before reading, as in ``read``
        page = self.ledger.recorder.select_notifications(self.position + 1, self.page_size, topics=self.topics)
        if page:
            self.position = page[-1].id
        to_domain_event = self.ledger.mapper.to_domain_event
        return [(n.id, to_domain_event(n)) for n in page]

    def seek(self, position: int) -> None:
        """Continue after ``position`` (backwards to re-read, forwards to skip)."""
        self.position = position

    # --- waiting ----------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a NOTIFY on the channel or ``timeout`` (capped at the poll interval).

        Returns whether a notification woke it. Any commit on the channel wakes it (the
        channel is per table name, so other schemas' commits do too): callers re-read.
        """
        limit = self.poll_interval_s if timeout is None else max(0.0, min(timeout, self.poll_interval_s))
        conn = self._listening() if self.listen else None
        if conn is None:
            time.sleep(limit)
            return False
        try:
            woke = False
            for _ in conn.notifies(timeout=limit, stop_after=1):
                woke = True
            if woke:
                self.wakeups += 1
                # A burst of commits queues one notification each: drop the rest, the
                # next read sees all of them anyway.
                for _ in conn.notifies(timeout=0.0):
                    pass
            return woke
        except psycopg.Error as exc:
            log.warning("LISTEN connection lost (%s); polling until it is back", exc)
            self._drop()
            return False

    def follow(self, stop: threading.Event) -> Iterator[list[tuple[int, Any]]]:
        """Pages of new events until ``stop`` is set (empty lists on quiet timeouts)."""
        while not stop.is_set():
            events = self.read()
            yield events
            if not events:
                self.wait()

    def close(self) -> None:
        """Close the LISTEN connection."""
        self._drop()

    def _listening(self) -> psycopg.Connection[Any] | None:
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._next_connect:
            return None
        try:
            conn = connect_like(self.ledger)
            conn.execute(SQL("LISTEN {0}").format(Identifier(self.channel)))
        except psycopg.Error as exc:
            log.warning("cannot LISTEN on %s (%s); polling every %.1f s", self.channel, exc, self.poll_interval_s)
            self._next_connect = time.monotonic() + RECONNECT_BACKOFF_S
            return None
        self._conn = conn
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._next_connect = time.monotonic() + RECONNECT_BACKOFF_S
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def __enter__(self) -> LogFollower:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
