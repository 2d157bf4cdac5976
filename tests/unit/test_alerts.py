"""Alerts: a structured log line per safety event, and a webhook that retries and never blocks."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import orjson
import pytest

from domain.model import Model
from domain.spec import LearnerSpec
from server.alerts import Alerts


def _drift_events() -> list[Any]:
    model = Model(
        name="credit", spec=LearnerSpec(kind="logistic", n_features=2), platform=(), initial_digest="d", actor="t"
    )
    model.detect_drift("adwin", uuid4(), {"error_estimate": 0.4, "window": 120.0}, "pause", "learner")
    model.pause("drift detected by adwin", "learner")
    return list(model.collect_events())


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    failures = [1]  # the first POST fails: the sender must retry

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if failures[0] > 0:
                failures[0] -= 1
                self.send_response(500)
            else:
                received.append(orjson.loads(body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def test_drift_alert_is_logged_and_posted_with_retries(
    receiver: tuple[str, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    url, received = receiver
    alerts = Alerts(lambda _id: "credit", url, backoff_s=0.01)
    events = _drift_events()
    with caplog.at_level(logging.WARNING, logger="learnledger.alerts"):
        alerts.observe(events)
    (record,) = [r for r in caplog.records if r.name == "learnledger.alerts"]
    assert record.alert["alert"] == "DriftDetected" and record.alert["detector"] == "adwin"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    alerts.close()
    (body,) = received
    assert body["alert"] == "DriftDetected"
    assert body["model"] == "credit" and body["action"] == "pause"
    assert body["figures"] == {"error_estimate": 0.4, "window": 120.0}
    assert body["version"] == events[1].originator_version
    assert alerts.sent == 1 and alerts.failed == 0


def test_a_dead_webhook_never_blocks_the_caller() -> None:
    alerts = Alerts(lambda _id: "credit", "http://127.0.0.1:9/nothing-listens", retries=1, backoff_s=0.01)
    started = time.perf_counter()
    for _ in range(100):
        alerts.observe(_drift_events())
    assert time.perf_counter() - started < 1.0  # queued, not sent inline
    alerts.close(timeout=10)
    assert alerts.failed >= 1 and alerts.sent == 0
