"""``learnledger demo`` through a real in-process gRPC server: predict, label late, learn, audit."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from server.client import Label, LedgerClient
from server.grpc_server import ServerSettings, build_server
from server.services import LedgerService
from server.simulate import SimulationProgress, score_chunk
from server.streams import label_arrivals

CHUNK = 64
CATCH_UP_TIMEOUT_S = 60.0


def run_grpc_demo(
    service: LedgerService,
    model: str,
    spec: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    delays: np.ndarray,
    *,
    progress: Callable[[SimulationProgress], None] | None = None,
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
            stats = SimulationProgress(model_version=int(info.version))
            n = len(y)
            arrivals = label_arrivals(delays)
            ids: list[str] = [""] * n
            for start in range(0, n, CHUNK):
                stop = min(start + CHUNK, n)
                served = client.predict_batch(model, x[start:stop].tolist())
                ids[start:stop] = [p.prediction_id for p in served]
                scores = np.asarray([[p.score] for p in served])
                decisions = np.asarray([p.decision for p in served])
                score_chunk(stats, "binary", scores, decisions, y[start:stop])
                stats.model_version = max(stats.model_version, *(p.model_version for p in served))
                stats.predictions = stop
                labels = [Label(ids[k], float(y[k]), source="demo") for t in range(start, stop) for k in arrivals[t]]
                if labels:
                    summary = client.feedback_stream(labels, per_message=256)
                    stats.labels += summary.accepted + summary.late
                    stats.late_labels += summary.late
                stats.seconds = time.perf_counter() - started
                if progress is not None:
                    progress(stats)
            expected = int(info.labels_consumed) + stats.labels - stats.late_labels
            info = _wait_for_learner(client, model, expected, batch_size)
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
        "late_labels": stats.late_labels,
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


def _wait_for_learner(client: LedgerClient, model: str, expected_labels: int, batch_size: int) -> Any:
    # Caught up: fewer labels left than make a full batch (holdout examples ride along
    # with the next batch), or learning is held by a rollout or a pause.
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    info = client.get_model(model)
    while (
        expected_labels - info.labels_consumed >= 2 * batch_size
        and not info.HasField("rollout")
        and not info.paused
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
        info = client.get_model(model)
    return info
