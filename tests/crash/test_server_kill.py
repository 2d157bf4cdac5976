"""Kill -9 the server while 64 clients send; restart; nothing acknowledged is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from server.client import LedgerClient
from tests.processes import start_serve

CLIENTS = 64


@pytest.fixture
def serve_env(cli_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The CLI environment, with the learner on and a small snapshot interval."""
    env = dict(cli_env, LEARNLEDGER_SNAPSHOT_INTERVAL="10", PYTHONUNBUFFERED="1")
    yield env


@pytest.mark.slow
def test_kill_9_loses_nothing_acknowledged(serve_env: dict[str, str], tmp_path: Path, runtime_for_env: object) -> None:
    log_path = tmp_path / "serve.log"
    proc, address = start_serve(serve_env, log_path)
    with LedgerClient(address, retries=0) as admin:
        admin.register_model("crash", {"kind": "logistic", "n_features": 4, "batch_size": 8})
    acked_predictions: set[str] = set()
    acked_labels: dict[str, float] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(k: int) -> None:
        with LedgerClient(address, retries=0, timeout_s=10) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    p = c.predict("crash", [float(k), float(i), 1.0, -1.0])
                    with lock:
                        acked_predictions.add(p.prediction_id)
                    label = float((k + i) % 2)
                    c.feedback(p.prediction_id, label)
                    with lock:
                        acked_labels[p.prediction_id] = label
                except grpc.RpcError:
                    return  # the server died under us: anything unacknowledged may be lost

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(4.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked_predictions) > 200 and len(acked_labels) > 100

    # Restart: the learner re-derives the labels it had not learned yet.
    proc, address = start_serve(serve_env, log_path)
    try:
        with LedgerClient(address, retries=3) as c:
            assert c.get_model("crash").version >= 1
        ledger = runtime_for_env.ledger  # type: ignore[attr-defined]
        found = ledger.get_predictions(uuid.UUID(pid) for pid in acked_predictions)
        assert set(map(str, found)) == acked_predictions
        for pid, label in acked_labels.items():
            assert found[uuid.UUID(pid)].label == label
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-2000:]
    audit = subprocess.run(
        [sys.executable, "-m", "server.cli", "audit", "verify", "--json"],
        env=serve_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    payload = json.loads(audit.stdout)
    assert audit.returncode == 0 and payload["verified"], audit.stderr
    assert payload["updates_replayed"] >= 1


@pytest.fixture
def runtime_for_env(database_url: str, schema: str) -> Iterator[object]:
    """A reader of the server's schema, for checking the log directly."""
    from tests.conftest import make_runtime

    rt = make_runtime(database_url, schema)
    yield rt
    rt.close()
