"""The composition root: settings in, a wired ``LedgerService`` out."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from projections.platform import configure_jax_determinism

# Must run before anything imports jax (see projections.platform).
configure_jax_determinism()

from domain.ledger import Ledger  # noqa: E402
from server.database import Database, open_database  # noqa: E402
from server.services import LedgerService  # noqa: E402

log = logging.getLogger(__name__)

DDL_ATTEMPTS = 5


@dataclass(frozen=True)
class Settings:
    """Configuration read once, at the edge (STYLE.md §10); it never changes what is computed."""

    snapshot_interval: int = 100
    schema: str = ""

    @classmethod
    def from_env(cls) -> Settings:
        """Read ``LEARNLEDGER_SNAPSHOT_INTERVAL`` and ``LEARNLEDGER_SCHEMA``."""
        return cls(
            snapshot_interval=int(os.environ.get("LEARNLEDGER_SNAPSHOT_INTERVAL", "100")),
            schema=os.environ.get("LEARNLEDGER_SCHEMA", ""),
        )


@dataclass
class Runtime:
    """Everything a command needs, opened together and closed together."""

    database: Database
    ledger: Ledger
    service: LedgerService

    def close(self) -> None:
        """Close connection pools (the embedded server stops when its last user exits)."""
        self.ledger.close()


def build(settings: Settings, database: Database | None = None) -> Runtime:
    """Open the database and wire the ledger and its services."""
    db = database or open_database(schema=settings.schema)
    ledger = _ledger(db)
    service = LedgerService(ledger, snapshot_interval=settings.snapshot_interval)
    return Runtime(db, ledger, service)


def _ledger(db: Database) -> Ledger:
    # Opening the ledger runs its (idempotent) DDL. Processes started together (serve
    # replicas and learn processes) run it at once, and concurrent CREATE OR REPLACE
    # FUNCTION can deadlock in PostgreSQL: the one it picks as the victim retries.
    for attempt in range(DDL_ATTEMPTS):
        try:
            return Ledger(env=db.env)
        except Exception as exc:
            if "deadlock detected" not in str(exc) or attempt == DDL_ATTEMPTS - 1:
                raise
            log.warning("schema set-up deadlocked with another process; retrying")
            time.sleep(random.uniform(0.05, 0.5))
    raise AssertionError("unreachable")


@contextmanager
def runtime(settings: Settings | None = None) -> Iterator[Runtime]:
    """``build`` as a context manager."""
    rt = build(settings or Settings.from_env())
    try:
        yield rt
    finally:
        rt.close()
