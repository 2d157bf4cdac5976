"""Alerts on committed safety events: a structured log line, and an optional webhook.

The Prometheus side is ``server.metrics`` (drift detections and gate rejections per
model). A webhook receives each alert as a JSON POST from a background thread with
retries and backoff: a slow or dead receiver never holds up serving or learning, and
an alert that still fails after its retries is logged and dropped (the event itself is
in the log forever; the webhook is only a notification).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

import orjson

from domain.model import Model

log = logging.getLogger("learnledger.alerts")

ALERTING = (Model.DriftDetected, Model.RolloutAborted, Model.Rebaselined)
_ALERTING_TYPES = frozenset(ALERTING)  # a set lookup per event: commits carry thousands of labels
QUEUE_LIMIT = 10_000


def alert_payload(event: Any, model_name: str) -> dict[str, Any]:
    """The JSON body of an alert: the event's fields plus where it is in the log."""
    body: dict[str, Any] = {
        "alert": type(event).__name__,
        "model": model_name,
        "model_id": str(event.originator_id),
        "version": event.originator_version,
        "time": event.timestamp.isoformat(),
    }
    match event:
        case Model.DriftDetected():
            body.update(
                detector=event.detector,
                at_prediction=str(event.at_prediction),
                figures=event.figures,
                action=event.action,
            )
        case Model.RolloutAborted():
            body.update(reason=event.reason, figures=event.figures, to_version=event.to_version)
        case Model.Rebaselined():
            body.update(reason=event.reason, examples=len(event.prediction_ids), epochs=event.epochs)
    return body


class Alerts:
    """Watches committed events; alerts on drift, aborted rollouts and rebaselines."""

    def __init__(
        self,
        model_name: Callable[[UUID], str],
        webhook_url: str | None = None,
        *,
        retries: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 5.0,
    ):
        self.model_name = model_name
        self.webhook_url = webhook_url
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        if webhook_url:
            self._thread = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
            self._thread.start()

    def observe(self, events: Sequence[Any], _ids: Sequence[int] | None = None) -> None:
        """Writer listener: log and queue an alert for each alerting event (never blocks)."""
        for event in events:
            if type(event) not in _ALERTING_TYPES:
                continue
            body = alert_payload(event, self.model_name(event.originator_id))
            log.warning("alert %s on model %s", body["alert"], body["model"], extra={"alert": body})
            if self._thread is not None:
                try:
                    self._queue.put_nowait(body)
                except queue.Full:
                    self.failed += 1
                    log.error("alert queue full: webhook alert for model %s dropped", body["model"])

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop the sender."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            body = self._queue.get()
            if body is None:
                return
            self._deliver(body)

    def _deliver(self, body: dict[str, Any]) -> None:
        assert self.webhook_url is not None
        data = orjson.dumps(body)
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(
                self.webhook_url, data=data, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    if 200 <= response.status < 300:
                        self.sent += 1
                        return
            except Exception as exc:  # any failure is retried the same way
                log.info("alert webhook attempt %d failed: %s", attempt + 1, exc)
            time.sleep(self.backoff_s * 2**attempt)
        self.failed += 1
        log.error(
            "alert webhook gave up after %d attempts: %s on model %s", self.retries + 1, body["alert"], body["model"]
        )
