"""End to end through a real gRPC server: register → predict → feedback → learn → time travel."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from server.client import Label, LedgerClient
from server.grpc_server import LedgerServer


def wait_for_version(client: LedgerClient, model: str, at_least: int, timeout: float = 30.0) -> int:
    """Poll until the model's version reaches ``at_least``."""
    deadline = time.monotonic() + timeout
    while True:
        version = client.get_model(model).version
        if version >= at_least or time.monotonic() > deadline:
            return version
        time.sleep(0.05)


def test_register_predict_feedback_learns_and_time_travels(client: LedgerClient, registered: str, runtime: Any) -> None:
    # Given a registered model at version 1
    info = client.get_model(registered)
    assert info.version == 1
    v1_digest = info.params_digest
    # When 8 predictions are made and labeled (two batches of 4)
    preds = [client.predict(registered, [float(i), 1.0 - i, 0.5 * i]) for i in range(8)]
    assert all(p.model_version == 1 and p.params_digest == v1_digest for p in preds)
    statuses = [client.feedback(p.prediction_id, float(i % 2)) for i, p in enumerate(preds)]
    assert statuses == ["ACCEPTED"] * 8
    # Then the learner records two updates and the model version advances
    assert wait_for_version(client, registered, 3) == 3
    head = client.get_model(registered)
    assert head.updates_applied == 2 and head.params_digest != v1_digest
    # And the next prediction is served from the new head
    later = client.predict(registered, [1.0, 2.0, 3.0])
    assert later.model_version == 3 and later.params_digest == head.params_digest
    # And GetState at an old version reproduces that version's digest
    versions = client.list_versions(registered)
    assert [v.version for v in versions] == [1, 2, 3]
    for v in versions:
        assert client.get_state(registered, version=v.version).params_digest == v.params_digest
    assert client.get_state(registered, version=1).params_digest == v1_digest
    state = client.get_state(registered, version=1, features=[1.0, 2.0, 3.0])
    assert state.score == pytest.approx(0.5)
    # And the audit replays every version
    audit = client.verify_audit(registered)
    assert audit.verified and audit.updates_replayed == 2
    # And the caller identity is recorded on the events it caused
    made = runtime.ledger.get_prediction(__import__("uuid").UUID(preds[0].prediction_id))
    assert made.actor == "anonymous"


def test_predict_batch_commits_every_row(client: LedgerClient, registered: str, runtime: Any) -> None:
    before = runtime.ledger.recorder.max_notification_id()
    rows = [[float(i), 0.0, 1.0] for i in range(256)]
    results = client.predict_batch(registered, rows)
    assert len(results) == 256 and len({r.prediction_id for r in results}) == 256
    assert runtime.ledger.recorder.max_notification_id() == before + 256


def test_predict_key_reuse_same_features_returns_original(client: LedgerClient, registered: str, runtime: Any) -> None:
    first = client.predict(registered, [1.0, 2.0, 3.0], prediction_id="order-17")
    before = runtime.ledger.recorder.max_notification_id()
    again = client.predict(registered, [1.0, 2.0, 3.0], prediction_id="order-17")
    assert again == first
    assert runtime.ledger.recorder.max_notification_id() == before


def test_feedback_stream_summarises(client: LedgerClient, registered: str) -> None:
    preds = client.predict_batch(registered, [[float(i), 1.0, 0.0] for i in range(40)])
    labels = [Label(p.prediction_id, float(i % 2)) for i, p in enumerate(preds)]
    labels.append(Label(preds[0].prediction_id, 0.0))  # identical repeat
    labels.append(Label("no-such-prediction", 1.0))
    summary = client.feedback_stream(labels, per_message=16)
    assert (summary.accepted, summary.duplicate, summary.rejected) == (40, 1, 1)
    assert summary.errors[0][2] == "NOT_FOUND"
    single = client.feedback_stream(
        [Label(p.prediction_id, float(i % 2)) for i, p in enumerate(preds[:5])], per_message=1
    )
    assert single.duplicate == 5
    assert wait_for_version(client, registered, 11) == 11


def test_rollback_pause_resume_and_watch(client: LedgerClient, registered: str) -> None:
    preds = client.predict_batch(registered, [[float(i), 1.0, 0.0] for i in range(8)])
    for i, p in enumerate(preds):
        client.feedback(p.prediction_id, float(i % 2))
    assert wait_for_version(client, registered, 3) == 3
    v1 = client.get_state(registered, version=1).params_digest
    rolled = client.rollback(registered, 1, "bad update")
    assert rolled.version == 4 and rolled.params_digest == v1
    assert client.predict(registered, [0.0, 0.0, 0.0]).params_digest == v1
    paused = client.pause(registered, "investigating")
    assert paused.paused
    with pytest.raises(grpc.RpcError) as err:
        client.pause(registered, "again")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    client.resume(registered, "done")
    watched = client.watch_model(registered, from_version=3, timeout_s=5)
    events = [next(watched) for _ in range(3)]
    assert [(e.version, e.event) for e in events] == [(4, "RolledBack"), (5, "Paused"), (6, "Resumed")]
    assert events[0].params_digest == v1
    watched.cancel()  # type: ignore[attr-defined]
    assert client.verify_audit().verified


def test_health_and_reflection(server: LedgerServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "learnledger.v1.Ledger"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in reply.list_services_response.service}
        assert "learnledger.v1.Ledger" in names and "grpc.health.v1.Health" in names


def test_restart_relearns_committed_but_unlearned_labels(start_server: Any, runtime: Any) -> None:
    first = start_server()
    with LedgerClient(first.address, retries=0) as c:
        c.register_model("m1", {"kind": "logistic", "n_features": 3, "batch_size": 4})
        preds = c.predict_batch("m1", [[float(i), 1.0, 0.0] for i in range(8)])
        for i, p in enumerate(preds[:6]):
            c.feedback(p.prediction_id, float(i % 2))
        assert wait_for_version(c, "m1", 2) == 2
    first.stop(grace=2.0)  # two labels committed, waiting for a full batch
    second = start_server()
    with LedgerClient(second.address, retries=0) as c:
        for i, p in enumerate(preds[6:], start=6):
            c.feedback(p.prediction_id, float(i % 2))
        assert wait_for_version(c, "m1", 3) == 3
        history = c.list_versions("m1")
        assert history[-1].batch_size == 4
        assert c.verify_audit("m1").verified
    update = runtime.ledger.get_model_events(runtime.ledger.get_model("m1").id)[-1]
    assert [str(x) for x in update.prediction_ids] == [p.prediction_id for p in preds[4:8]]
