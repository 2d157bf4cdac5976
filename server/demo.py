"""``learnledger demo`` through a real in-process gRPC server: predict, label late, learn, audit."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from server.client import Label, LedgerClient
from server.grpc_server import ServerSettings, build_server
from server.services import LedgerService

CHUNK = 64
CATCH_UP_TIMEOUT_S = 60.0


@dataclass
class DemoProgress:
    """Running figures the demo prints."""

    predictions: int = 0
    labels: int = 0
    late: int = 0
    correct: int = 0
    log_loss_sum: float = 0.0
    model_version: int = 0
    updates: int = 0
    seconds: float = 0.0

    @property
    def accuracy(self) -> float | None:
        """Prequential accuracy so far."""
        return self.correct / self.predictions if self.predictions else None


def run_grpc_demo(
    service: LedgerService,
    model: str,
    spec: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    delays: np.ndarray,
    *,
    progress: Callable[[DemoProgress], None] | None = None,
) -> dict[str, Any]:
    """Drive a drifting binary stream through gRPC as a client would.

    Rows are predicted in batches (``PredictBatch``); example ``i``'s label is sent
    ``delays[i]`` predictions later over ``FeedbackBatchStream``, so labels arrive late
    and out of order. The server learns in the background from committed labels, so
    each prediction is served by whatever version was live at that moment, exactly as
    in production. At the end the demo waits for the learner to catch up and asks the
    server to replay and verify the whole history.
    """
    started = time.perf_counter()
    server = build_server(service, ServerSettings(host="127.0.0.1", port=0, workers=16))
    server.start()
    try:
        with LedgerClient(server.address) as client:
            try:
                info = client.get_model(model)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                    raise
                info = client.register_model(model, spec)
            batch_size = int(info.spec.batch_size)
            updates_before = int(info.updates_applied)
            stats = DemoProgress(model_version=int(info.version))
            n = len(y)
            due = np.minimum(np.arange(n) + np.maximum(delays, 0), n - 1)
            arrivals: list[list[int]] = [[] for _ in range(n)]
            for i in range(n - 1, -1, -1):  # same-step labels arrive newest first
                arrivals[int(due[i])].append(i)
            ids: list[str] = [""] * n
            for start in range(0, n, CHUNK):
                stop = min(start + CHUNK, n)
                served = client.predict_batch(model, x[start:stop].tolist())
                for offset, prediction in enumerate(served):
                    k = start + offset
                    ids[k] = prediction.prediction_id
                    _score(stats, prediction.score, prediction.decision, float(y[k]))
                    stats.model_version = max(stats.model_version, prediction.model_version)
                stats.predictions = stop
                labels = [Label(ids[k], float(y[k]), source="demo") for t in range(start, stop) for k in arrivals[t]]
                if labels:
                    summary = client.feedback_stream(labels, per_message=256)
                    stats.labels += summary.accepted + summary.late
                    stats.late += summary.late
                stats.seconds = time.perf_counter() - started
                if progress is not None:
                    progress(stats)
            expected = updates_before + (stats.labels - stats.late + _pending(info)) // batch_size
            info = _wait_for_learner(client, model, expected)
            stats.updates = int(info.updates_applied) - updates_before
            stats.model_version = int(info.version)
            audit = client.verify_audit(model)
    finally:
        server.stop(grace=5.0)
    seconds = time.perf_counter() - started
    return {
        "model": model,
        "predictions": stats.predictions,
        "examples": stats.predictions,
        "labels": stats.labels,
        "late_labels": stats.late,
        "updates": stats.updates,
        "model_version": stats.model_version,
        "params_digest": info.params_digest,
        "prequential_accuracy": stats.accuracy,
        "accuracy": stats.accuracy,
        "log_loss": stats.log_loss_sum / max(stats.predictions, 1),
        "seconds": round(seconds, 3),
        "examples_per_s": round(stats.predictions / seconds, 1) if seconds > 0 else 0.0,
        "audit_verified": bool(audit.verified),
        "versions_checked": int(audit.versions_checked),
        "via": "grpc",
    }


def _pending(info: Any) -> int:
    # Labels a previous run left waiting for a full batch are learned first; the demo
    # cannot see them, so it waits only for the batches its own labels complete.
    return 0


def _wait_for_learner(client: LedgerClient, model: str, expected_updates: int) -> Any:
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    info = client.get_model(model)
    while info.updates_applied + info.updates_rejected < expected_updates and time.monotonic() < deadline:
        time.sleep(0.05)
        info = client.get_model(model)
    return info


def _score(stats: DemoProgress, score: float, decision: float, label: float) -> None:
    p1 = min(max(score, 1e-15), 1 - 1e-15)
    stats.log_loss_sum += -math.log(p1 if label == 1.0 else 1 - p1)
    stats.correct += int(decision == label)
