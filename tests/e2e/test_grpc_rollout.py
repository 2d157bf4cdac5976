"""Rebaseline and canary rollout through a real gRPC server: traffic split by prediction
id, the candidate judged on labeled canary traffic, every step an event."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from domain.model import Model
from server.client import Label, LedgerClient
from server.grpc_server import LedgerServer

POLICY = {"rollout_stages": [0.05, 0.25, 1.0], "rollout_min_labels": 12, "rollout_tolerance": 0.1}
SPEC = {"kind": "logistic", "n_features": 3, "batch_size": 8, "learning_rate": 0.05, "policy": POLICY}


def _traffic(client: LedgerClient, n: int, rng: np.random.Generator, label: bool = True) -> list[Any]:
    x = rng.normal(size=(n, 3))
    y = (x @ np.array([1.0, -2.0, 0.5]) > 0).astype(float)
    served = client.predict_batch("m", x.tolist())
    if label:
        client.feedback_stream([Label(p.prediction_id, float(t)) for p, t in zip(served, y, strict=True)])
    return served


def _wait(client: LedgerClient, done: Any, timeout_s: float = 30.0) -> Any:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = client.get_model("m")
        if done(info):
            return info
        time.sleep(0.05)
    raise AssertionError(f"timed out; last model info: {info}")


def test_rebaselined_candidate_serves_a_share_by_prediction_id_then_completes(
    server: LedgerServer, client: LedgerClient, runtime: Any
) -> None:
    rng = np.random.default_rng(0)
    client.register_model("m", SPEC)
    _traffic(client, 400, rng)
    _wait(client, lambda i: i.updates_applied >= 45)
    # When an operator rebaselines on the last hour
    info = client.rebaseline("m", 3600.0, reason="weekly refresh")
    assert info.HasField("rollout") and info.rollout.fraction == pytest.approx(0.05)
    candidate, champion = info.rollout.candidate_version, info.rollout.champion_version
    assert info.serving_version == champion < candidate == info.version
    # Then predictions are served by both states, each recorded with its own version
    served = _traffic(client, 600, rng, label=False)
    versions = [p.model_version for p in served]
    share = versions.count(candidate) / len(versions)
    assert set(versions) == {champion, candidate}
    assert 0.01 < share < 0.12
    made = runtime.ledger.get_predictions([p.prediction_id for p in served[:50]])
    assert {p.routing for p in made.values()} <= {"candidate", "control"}
    # And with labels coming back, the candidate advances stage by stage to all traffic
    for _ in range(10):
        _traffic(client, 400, rng)
        info = client.get_model("m")
        if not info.HasField("rollout"):
            break
    model = runtime.ledger.get_model("m")
    kinds = [type(e).__name__ for e in runtime.ledger.get_model_events(model.id)]
    assert "RolloutAdvanced" in kinds and "RolloutCompleted" in kinds, kinds
    done = next(e for e in runtime.ledger.get_model_events(model.id) if isinstance(e, Model.RolloutCompleted))
    assert done.figures["candidate_n"] >= 12 and done.figures["control_n"] >= 12
    # And afterwards one state serves everything and learning continues from the candidate
    after = _traffic(client, 50, rng)
    assert len({p.model_version for p in after}) == 1
    assert client.verify_audit("m").verified


def test_abort_rollout_puts_the_champion_back_on_all_traffic(
    server: LedgerServer, client: LedgerClient, runtime: Any
) -> None:
    rng = np.random.default_rng(1)
    client.register_model("m", {**SPEC, "policy": {**POLICY, "rollout_min_labels": 10_000}})
    _traffic(client, 200, rng)
    _wait(client, lambda i: i.updates_applied >= 20)
    info = client.rebaseline("m", 3600.0, reason="try")
    champion_digest = runtime.ledger.get_model_at("m", info.rollout.champion_version).digest
    info = client.abort_rollout("m", "operator changed their mind")
    assert not info.HasField("rollout") and info.params_digest == champion_digest
    served = _traffic(client, 100, rng, label=False)
    assert {p.model_version for p in served} == {info.version}
    assert {p.params_digest for p in served} == {champion_digest}
    assert client.verify_audit("m").verified
