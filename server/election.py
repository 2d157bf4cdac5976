"""Leader election for learners: one PostgreSQL session advisory lock per model.

``ModelLock`` holds one model's lock on a connection of its own; ``LockSession`` holds
any number of them on one connection (``learn --workers``: a portfolio of 100 models
costs one lock connection, not 100).

The lock lives as long as the session that took it, so a learner that dies (even by
SIGKILL) releases it the moment the server notices its connection closed, and a waiting
learner takes over. Optimistic concurrency on the ``Model`` stream still guards every
commit: the lock prevents wasted work and interleaved batches, never a lost update.

Balancing between processes builds on these locks: ``server.balancer``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Collection, Iterable
from typing import Any
from uuid import UUID

import psycopg

from domain.ledger import Ledger
from server.balancer import Census
from server.log_follower import connect_like

log = logging.getLogger(__name__)

# Kill the session's backend quickly when its client vanishes without a FIN (power
# loss, network partition): otherwise the lock could outlive its holder by hours.
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}


def lock_key(schema: str, model_id: UUID) -> int:
    """The advisory lock key of a model: 64 bits of a hash of schema and model id.

    Advisory locks are per database, not per schema, and model ids are uuid5 of the
    name, so the schema is part of the key: two ledgers in one database never contend.
    """
    digest = hashlib.blake2b(f"learnledger-learner:{schema}:{model_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def group_key(schema: str, names: Collection[str]) -> int:
    """The advisory lock key the ``learn`` processes of a group share (``LockSession.join``).

    Processes balance only with peers that learn the same models: one started with
    ``--models a,b`` next to ones learning all models is not the all-models processes'
    peer (otherwise they would keep handing it models it never takes).
    """
    models = ",".join(sorted(set(names))) or "*"
    digest = hashlib.blake2b(f"learnledger-learners:{schema}:{models}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _halves(key: int) -> tuple[int, int]:
    # How pg_locks shows a bigint advisory key: its high and low 32 bits, unsigned.
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


class ModelLock:
    """A session advisory lock on a dedicated connection, held until ``release`` or death."""

    def __init__(self, ledger: Ledger, model_id: UUID):
        recorder: Any = ledger.recorder
        self.ledger = ledger
        self.model_id = model_id
        self.key = lock_key(recorder.datastore.schema, model_id)
        self._conn: psycopg.Connection[Any] | None = None
        self.held = False

    def try_acquire(self) -> bool:
        """Take the lock if free; True if this session holds it (now or already)."""
        if self.held and self.alive():
            return True
        self.held = False
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect_like(self.ledger, **KEEPALIVE)
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        except psycopg.Error as exc:
            log.warning("advisory lock attempt for model %s failed: %s", self.model_id, exc)
            self._close()
            return False
        self.held = bool(row and row[0])
        return self.held

    def alive(self) -> bool:
        """Whether the session holding the lock is still there (a cheap round trip).

        If the connection broke, the server released the lock: another learner may be
        leading already, so the caller must stop learning.
        """
        if self._conn is None or self._conn.closed:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error:
            self._close()
            self.held = False
            return False
        return True

    def release(self) -> None:
        """Give the lock up now; closing the session alone frees it only when the server
        notices the disconnect, so a successor asking at once could still find it held."""
        if self.held and self._conn is not None and not self._conn.closed:
            with contextlib.suppress(psycopg.Error):
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        self.held = False
        self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


class LockSession:
    """Many models' advisory locks held on one dedicated connection (``learn --workers``).

    Session advisory locks are per session, not per connection slot, so one session can
    hold every lock a process leads: a portfolio of 100 models costs one connection,
    not 100. Everything that was true of one lock stays true of the set: a process that
    dies frees all of them at once, and a broken session means every one may have a
    new holder — ``alive`` turns False and the caller must stop learning all of them.

    Not thread-safe: one coordinating thread asks, the workers only read ``held``.
    """

    def __init__(self, ledger: Ledger, *, group: Collection[str] = ()):
        recorder: Any = ledger.recorder
        self.ledger = ledger
        self.schema: str = recorder.datastore.schema
        self.group_key = group_key(self.schema, group)
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = 0
        self.held: frozenset[UUID] = frozenset()
        # Whether this session holds the group's shared lock (``join``); a new session
        # after a break has to join again.
        self.joined = False
        # Set when the session broke while holding locks, until ``acknowledge``: no new
        # session is opened before the caller has stopped learning the models it lost.
        self.lost = False

    def try_acquire(self, model_ids: Iterable[UUID]) -> frozenset[UUID]:
        """Try every lock not held yet, in one round trip; returns the ones taken now."""
        keys = {lock_key(self.schema, m): m for m in model_ids if m not in self.held}
        if not keys or self.lost:
            return frozenset()
        try:
            rows = (
                self._session()
                .execute("SELECT k, pg_try_advisory_lock(k) FROM unnest(%s::bigint[]) AS t(k)", (list(keys),))
                .fetchall()
            )
        except psycopg.Error as exc:
            log.warning("advisory lock attempt failed: %s", exc)
            self._broken()
            return frozenset()
        taken = frozenset(keys[k] for k, ok in rows if ok)
        self.held |= taken
        return taken

    def join(self) -> bool:
        """Announce this process as a live member of its group (the shared lock); True if it is.

        Join once able to lead any model of the group at once (compiled): peers hand a
        member models as soon as it appears in their census.
        """
        if self.joined or self.lost:
            return self.joined
        try:
            row = self._session().execute("SELECT pg_try_advisory_lock_shared(%s)", (self.group_key,)).fetchone()
        except psycopg.Error as exc:
            log.warning("joining the learner group failed: %s", exc)
            self._broken()
            return False
        self.joined = bool(row and row[0])
        return self.joined

    def census(self, model_ids: Iterable[UUID]) -> Census | None:
        """The group's members and the leaders of ``model_ids`` now, from ``pg_locks``
        (one round trip); None without a session (or if it broke)."""
        if self.lost or self._conn is None or self._conn.closed:
            return None
        keys = {_halves(lock_key(self.schema, m)): m for m in model_ids}
        group = _halves(self.group_key)
        wanted = [group, *keys]
        try:
            rows = self._conn.execute(
                "SELECT l.pid, l.classid::bigint, l.objid::bigint, l.mode FROM pg_locks l"
                " JOIN unnest(%s::bigint[], %s::bigint[]) AS k(hi, lo)"
                " ON l.classid::bigint = k.hi AND l.objid::bigint = k.lo"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                ([hi for hi, _ in wanted], [lo for _, lo in wanted]),
            ).fetchall()
        except psycopg.Error as exc:
            log.warning("reading the learner group's locks failed: %s", exc)
            self._broken()
            return None
        members = frozenset(pid for pid, hi, lo, mode in rows if (hi, lo) == group and mode == "ShareLock")
        holders = {keys[hi, lo]: pid for pid, hi, lo, mode in rows if (hi, lo) in keys and mode == "ExclusiveLock"}
        return Census(self._pid, members, holders)

    def alive(self) -> bool:
        """Whether the session holding the locks is still there (a cheap round trip).

        False also when there is no session yet. After a break the server released every
        lock: another process may lead those models already.
        """
        if self.lost or self._conn is None or self._conn.closed:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error:
            self._broken()
            return False
        return True

    def acknowledge(self) -> None:
        """The caller stopped learning every model it held: compete again."""
        self.lost = False

    def release(self, model_id: UUID) -> None:
        """Give one model's lock up now (a successor asking at once finds it free)."""
        if model_id not in self.held:
            return
        self.held -= {model_id}
        if self._conn is not None and not self._conn.closed:
            with contextlib.suppress(psycopg.Error):
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(self.schema, model_id),))

    def close(self) -> None:
        """Release every lock explicitly, then close (see ``ModelLock.release`` for why)."""
        if (self.held or self.joined) and self._conn is not None and not self._conn.closed:
            with contextlib.suppress(psycopg.Error):
                self._conn.execute("SELECT pg_advisory_unlock_all()")
        self.held = frozenset()
        self._broken()

    def _session(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = connect_like(self.ledger, **KEEPALIVE)
            try:
                row = conn.execute("SELECT pg_backend_pid()").fetchone()
            except psycopg.Error:
                conn.close()
                raise
            self._conn, self._pid, self.joined = conn, int(row[0]) if row else 0, False
        return self._conn

    def _broken(self) -> None:
        self.lost = self.lost or bool(self.held)
        self.held = frozenset()
        self.joined = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
