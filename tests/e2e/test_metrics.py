"""Prometheus metrics of a real in-process gRPC server, scraped over HTTP from ``/metrics``."""

from __future__ import annotations

import io
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from uuid import UUID, uuid4

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from domain.prediction import Prediction
from learnledger.v1 import ledger_pb2 as pb
from learnledger.v1 import ledger_pb2_grpc as pb_grpc
from server.client import LedgerClient
from server.grpc_server import LedgerServer
from server.logs import JsonFormatter
from server.metrics import LedgerMetrics
from tests.e2e.conftest import SPEC, TOKENS, token_table

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: LedgerServer, token: str | None = None) -> Samples:
    """Every sample of the server's ``/metrics`` page, keyed by name and label set."""
    assert server.metrics_endpoint is not None
    url = f"http://{server.host}:{server.metrics_endpoint.port}/metrics"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None if absent."""
    return samples.get((name, frozenset(labels.items())))


def rpc(samples: Samples, method: str, code: str) -> float | None:
    """``learnledger_rpc_requests_total`` of one Ledger method and status code."""
    return value(samples, "learnledger_rpc_requests_total", service="learnledger.v1.Ledger", method=method, code=code)


def wait_for_version(client: LedgerClient, model: str, at_least: int, timeout: float = 30.0) -> int:
    """Poll until the model's version reaches ``at_least``."""
    deadline = time.monotonic() + timeout
    while (version := client.get_model(model).version) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return version


@pytest.fixture
def metered(start_server: Callable[..., LedgerServer]) -> LedgerServer:
    """A server (no auth) with ``/metrics`` on a free port."""
    return start_server(metrics_port=0)


def test_counters_per_method_code_and_model_after_learning(metered: LedgerServer) -> None:
    with LedgerClient(metered.address, retries=0) as client:
        # Given a model with batch size 4, 8 predictions and their labels (two updates)
        client.register_model("m1", SPEC)
        preds = [client.predict("m1", [float(i), 1.0, 0.5]) for i in range(8)]
        assert [client.feedback(p.prediction_id, float(i % 2)) for i, p in enumerate(preds)] == ["ACCEPTED"] * 8
        assert wait_for_version(client, "m1", 3) == 3
        # And failing calls: a prediction for an unknown model, a watch on one (a stream)
        with pytest.raises(grpc.RpcError) as failed:
            client.predict("nope", [1.0, 2.0, 3.0])
        assert failed.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as watched:
            list(client.watch_model("nope", timeout_s=10))
        assert watched.value.code() is grpc.StatusCode.NOT_FOUND
        # And a second model whose batch (size 100) is far from full: 3 labels wait
        client.register_model("m2", {**SPEC, "batch_size": 100})
        waiting = client.predict_batch("m2", [[1.0, 2.0, 3.0]] * 3)
        for p in waiting:
            client.feedback(p.prediction_id, 1.0)
        time.sleep(0.05)

    # When /metrics is scraped
    samples = scrape(metered)

    # Then requests are counted by method and status code, the error codes included
    assert rpc(samples, "RegisterModel", "OK") == 2
    assert rpc(samples, "Predict", "OK") == 8
    assert rpc(samples, "Predict", "NOT_FOUND") == 1
    assert rpc(samples, "PredictBatch", "OK") == 1
    assert rpc(samples, "Feedback", "OK") == 11
    assert rpc(samples, "WatchModel", "NOT_FOUND") == 1  # a stream, counted once at its end
    assert rpc(samples, "Predict", "INTERNAL") is None
    # And latency histograms have buckets, one observation per call
    predict = {"service": "learnledger.v1.Ledger", "method": "Predict"}
    assert value(samples, "learnledger_rpc_latency_seconds_count", **predict) == 9
    assert value(samples, "learnledger_rpc_latency_seconds_bucket", **predict, le="+Inf") == 9
    buckets = [k for k in samples if k[0] == "learnledger_rpc_latency_seconds_bucket" and ("method", "Predict") in k[1]]
    assert len(buckets) > 10
    # And the per-model counters follow the committed events
    assert value(samples, "learnledger_predictions_total", model="m1") == 8
    assert value(samples, "learnledger_predictions_total", model="m2") == 3
    assert value(samples, "learnledger_labels_total", model="m1", kind="in_window") == 8
    assert value(samples, "learnledger_updates_applied_total", model="m1") == 2
    assert value(samples, "learnledger_updates_rejected_total", model="m1") is None
    # And the learner lag: m1 learned everything, m2 has 3 labels waiting for a while
    assert value(samples, "learnledger_learner_lag_labels", model="m1") == 0
    assert value(samples, "learnledger_learner_lag_seconds", model="m1") == 0
    assert value(samples, "learnledger_learner_lag_labels", model="m2") == 3
    assert (value(samples, "learnledger_learner_lag_seconds", model="m2") or 0) > 0
    # And every committed transaction's size was recorded (histogram sum = events)
    stats = metered.writer.stats
    assert value(samples, "learnledger_commit_batch_events_count") == stats.transactions
    assert value(samples, "learnledger_commit_batch_events_sum") == stats.events
    assert stats.events == 8 + 8 + 2 + 3 + 3  # predictions, labels, updates (registering bypasses the writer)
    assert value(samples, "learnledger_commit_latency_seconds_count") == stats.transactions


def test_request_id_returned_and_refusals_counted(start_server: Callable[..., LedgerServer]) -> None:
    server = start_server(tokens=token_table(), metrics_port=0)
    with grpc.insecure_channel(server.address) as channel:
        # Given a caller without a token that sends its own request id
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.LedgerStub(channel).GetModel(pb.GetModelRequest(name="m1"), metadata=(("x-request-id", "req-42"),))
        # Then the refusal carries the id back and is counted (the interceptor runs before auth)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert ("x-request-id", "req-42") in (refused.value.trailing_metadata() or ())
        # And a call without an id gets a fresh one
        _, ok = health_pb2_grpc.HealthStub(channel).Check.with_call(health_pb2.HealthCheckRequest())
        generated = dict(ok.trailing_metadata())["x-request-id"]
        assert generated and generated != "req-42"
    with LedgerClient(server.address, token=TOKENS["admin"][0], retries=0) as admin:
        admin.register_model("m1", SPEC)
    samples = scrape(server, TOKENS["auditor"][0])
    assert rpc(samples, "GetModel", "UNAUTHENTICATED") == 1
    assert rpc(samples, "RegisterModel", "OK") == 1
    check = {"service": "grpc.health.v1.Health", "method": "Check", "code": "OK"}
    assert value(samples, "learnledger_rpc_requests_total", **check) == 1


def test_with_tokens_a_scrape_needs_the_audit_role(start_server: Callable[..., LedgerServer]) -> None:
    server = start_server(tokens=token_table(), metrics_port=0)
    assert server.metrics_endpoint is not None
    url = f"http://{server.host}:{server.metrics_endpoint.port}/metrics"
    # Without a token, with an unknown one, and with one lacking the audit role: refused.
    for token, status in ((None, 401), ("not-a-token", 401), (TOKENS["predictor"][0], 403)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        assert refused.value.code == status
        assert "audit role" in refused.value.read().decode()
    # With the audit role: the page.
    samples = scrape(server, TOKENS["auditor"][0])
    assert value(samples, "learnledger_commit_latency_seconds_count") == 0.0


def test_no_endpoint_unless_asked(start_server: Callable[..., LedgerServer]) -> None:
    server = start_server()
    assert server.metrics_endpoint is None
    assert server.metrics.registry is not None  # still counted, for tests and a dashboard


def test_predict_logs_its_prediction_id_at_debug(server: LedgerServer, registered: str) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    servicer_log = logging.getLogger("server.servicer")
    servicer_log.addHandler(handler)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.LedgerStub(channel)
            request = pb.PredictRequest(model=registered, features=[1.0, 2.0, 3.0])
            stub.Predict(request, metadata=(("x-request-id", "quiet-1"),))  # INFO: no line
            servicer_log.setLevel(logging.DEBUG)
            reply = stub.Predict(request, metadata=(("x-request-id", "pred-1"),))
    finally:
        servicer_log.removeHandler(handler)
        servicer_log.setLevel(logging.NOTSET)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["prediction_id"], x["request_id"], x["model"], x["rpc"]) for x in lines] == [
        (reply.prediction_id, "pred-1", registered, "Predict")
    ]


class Model:
    """Stand-ins named like the domain's events (the projection matches qualified names)."""

    class UpdateRejected:
        """A rejected update, with the gate fields the domain is adding."""

        def __init__(self, model_id: UUID, ids: list[UUID], reason: str, through: UUID | None = None) -> None:
            self.originator_id, self.prediction_ids, self.reason = model_id, tuple(ids), reason
            self.holdout_ids, self.through = (), through

    class DriftDetected:
        """A drift detection."""

        def __init__(self, model_id: UUID, detector: str) -> None:
            self.originator_id, self.detector = model_id, detector


def test_projection_counts_gate_reasons_and_drift_by_event_name() -> None:
    metrics = LedgerMetrics(lambda model_id: "m9")
    mid, now = uuid4(), datetime.now(UTC)
    labels = []
    for _ in range(5):
        label = object.__new__(Prediction.Labeled)
        label.__dict__.update(originator_id=uuid4(), timestamp=now, model_id=mid, in_window=True)
        labels.append(label)
    ids = [e.originator_id for e in labels]
    metrics.events.observe(labels)
    assert metrics.events.lag(mid)[0] == 5
    metrics.events.observe(
        [
            # The batch, and everything before ``through`` in log order, is taken.
            Model.UpdateRejected(mid, ids[1:2], "holdout loss worse: t=4.2 (p=0.001)", through=ids[2]),
            Model.UpdateRejected(mid, ids[3:4], "holdout loss worse: t=3.1 (p=0.004)"),
            Model.DriftDetected(mid, "adwin"),
        ]
    )
    assert metrics.events.lag(mid)[0] == 1
    get = metrics.registry.get_sample_value
    assert get("learnledger_updates_rejected_total", {"model": "m9"}) == 2
    assert get("learnledger_gate_rejections_total", {"model": "m9", "reason": "holdout loss worse"}) == 2
    assert get("learnledger_drift_detections_total", {"model": "m9", "detector": "adwin"}) == 1
    assert get("learnledger_learner_lag_labels", {"model": "m9"}) == 1
