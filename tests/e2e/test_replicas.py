"""Serving replicas follow the log: two ``serve --no-learner`` processes and one ``learn``.

After an update (or a rollback) commits, both replicas serve it — the PredictResponse
carries that version and digest — within a second; a replica started from scratch
loads the head from a parameter snapshot instead of folding from genesis.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domain.spec import LearnerSpec
from server.client import LedgerClient
from tests.conftest import make_runtime
from tests.processes import LearnProcess, start_serve, wait_for_leader

SPEC = LearnerSpec(kind="logistic", n_features=3, batch_size=4, learning_rate=0.1)
SNAPSHOT_INTERVAL = 5
FRESH_S = 1.0


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI environment with a small snapshot interval."""
    return dict(cli_env, LEARNLEDGER_SNAPSHOT_INTERVAL=str(SNAPSHOT_INTERVAL), PYTHONUNBUFFERED="1")


@pytest.fixture
def rt(database_url: str, schema: str) -> Iterator[Any]:
    """A reader of the replicas' schema."""
    runtime = make_runtime(database_url, schema, snapshot_interval=SNAPSHOT_INTERVAL)
    yield runtime
    runtime.close()


def wait_served(clients: list[LedgerClient], version: int, digest: str, since: float) -> float:
    """Predict on every replica until each serves ``version``/``digest``; seconds since ``since``."""
    pending = list(clients)
    while pending and time.monotonic() - since < 10:
        for c in list(pending):
            p = c.predict("rep", [0.1, 0.2, 0.3])
            if p.model_version == version:
                assert p.params_digest == digest
                pending.remove(c)
        time.sleep(0.01)
    assert not pending, f"{len(pending)} replica(s) never served version {version}"
    return time.monotonic() - since


def wait_head(rt: Any, above: int) -> tuple[Any, float]:
    """Poll the log until the model's version passes ``above``; the head and when seen."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        head = rt.ledger.get_model("rep")
        if head.version > above:
            return head, time.monotonic()
        time.sleep(0.005)
    raise AssertionError(f"no version after {above} was committed")


def label_rows(client: LedgerClient, n: int, k: int) -> None:
    """Predict ``n`` rows on ``client`` and label each (one batch when n == batch size)."""
    for i in range(n):
        p = client.predict("rep", [float(i), float(k), 1.0])
        assert client.feedback(p.prediction_id, float((i + k) % 2)) == "ACCEPTED"


@pytest.mark.slow
def test_replicas_follow_updates_rollbacks_and_restart_from_snapshots(
    env: dict[str, str], rt: Any, tmp_path: Path
) -> None:
    rt.service.register_model("rep", SPEC, "test")
    procs: list[subprocess.Popen[str]] = []
    learner = LearnProcess(env, tmp_path / "learn.log")
    try:
        a, address_a = start_serve(env, tmp_path / "a.log", "--no-learner")
        b, address_b = start_serve(env, tmp_path / "b.log", "--no-learner")
        procs += [a, b]
        wait_for_leader([learner])
        with LedgerClient(address_a, retries=0) as ca, LedgerClient(address_b, retries=0) as cb:
            for k in range(12):  # labels through one replica, served by both
                before = rt.ledger.get_model("rep").version
                label_rows(ca if k % 2 else cb, SPEC.batch_size, k)
                head, seen = wait_head(rt, before)
                assert wait_served([ca, cb], head.version, head.digest, seen) < FRESH_S

            # A rollback by an operator in yet another process.
            before = rt.ledger.get_model("rep").version
            rollback = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "server.cli",
                    "rollback",
                    "rep",
                    "--to-version",
                    "3",
                    "--reason",
                    "replica test",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert rollback.returncode == 0, rollback.stderr
            head, seen = wait_head(rt, before)
            assert head.digest == rt.ledger.get_model_at("rep", 3).digest
            assert wait_served([ca, cb], head.version, head.digest, seen) < FRESH_S

            # The learner keeps learning on top of the rolled-back state; replicas follow.
            label_rows(ca, SPEC.batch_size, 99)
            head, seen = wait_head(rt, head.version)
            assert wait_served([ca, cb], head.version, head.digest, seen) < FRESH_S

        # A replica restarted from scratch loads from a snapshot, not from genesis.
        b.send_signal(signal.SIGTERM)
        assert b.wait(60) == 0
        assert rt.service.store.count_snapshots(head.id) >= 2
        c, address_c = start_serve(env, tmp_path / "c.log", "--no-learner")
        procs.append(c)
        with LedgerClient(address_c, retries=0) as cc:
            wait_served([cc], head.version, head.digest, time.monotonic())
        log_c = (tmp_path / "c.log").read_text()
        assert f"model rep serves version {head.version}, loaded from snapshot at version" in log_c, log_c[-3000:]
        assert "from genesis" not in log_c
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        learner.terminate()
        for p in procs:
            p.wait(60)
