"""The auth matrix: every role against every RPC, plus missing and invalid tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from server.auth import METHOD_ROLES
from server.client import Label, LedgerClient
from server.grpc_server import LedgerServer
from tests.e2e.conftest import SPEC, TOKENS, token_table


@pytest.fixture
def secured(start_server: Callable[..., LedgerServer]) -> LedgerServer:
    """A server with the test token table, and a model with one labeled prediction."""
    server = start_server(tokens=token_table())
    with LedgerClient(server.address, token=TOKENS["admin"][0], retries=0) as admin:
        admin.register_model("m1", SPEC)
    return server


def calls(c: LedgerClient, pid: str) -> dict[str, Callable[[], Any]]:
    """One harmless call per RPC (each succeeds for a caller with the right role)."""
    return {
        "RegisterModel": lambda: c.register_model(f"r{abs(hash(c)) % 10**9}", SPEC),
        "GetModel": lambda: c.get_model("m1"),
        "ListModels": lambda: c.list_models(),
        "Predict": lambda: c.predict("m1", [1.0, 2.0, 3.0]),
        "PredictBatch": lambda: c.predict_batch("m1", [[1.0, 2.0, 3.0]]),
        "Feedback": lambda: c.feedback(pid, 1.0),
        "FeedbackStream": lambda: c.feedback_stream([Label(pid, 1.0)], per_message=1),
        "FeedbackBatchStream": lambda: c.feedback_stream([Label(pid, 1.0)], per_message=8),
        "ListVersions": lambda: c.list_versions("m1"),
        "GetState": lambda: c.get_state("m1", version=1),
        "VerifyAudit": lambda: c.verify_audit("m1"),
        "Explain": lambda: c.explain(pid),
        "WatchModel": lambda: next(c.watch_model("m1", timeout_s=5)),
        "Pause": lambda: c.pause("m1", "matrix"),
        "Resume": lambda: c.resume("m1", "matrix"),
        # Allowed callers reach the domain, which refuses (no trained examples, no rollout).
        "Rebaseline": lambda: _refused_by_domain(lambda: c.rebaseline("m1", 3600.0)),
        "AbortRollout": lambda: _refused_by_domain(lambda: c.abort_rollout("m1", "matrix")),
        "Rollback": lambda: c.rollback("m1", 1, "matrix"),  # last: Pause/Resume made versions 2 and 3
    }


def _refused_by_domain(call: Callable[[], Any]) -> None:
    try:
        call()
    except grpc.RpcError as err:
        if err.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            raise


def test_every_rpc_is_in_the_matrix() -> None:
    from learnledger.v1 import ledger_pb2

    rpcs = set(ledger_pb2.DESCRIPTOR.services_by_name["Ledger"].methods_by_name)
    assert rpcs == set(METHOD_ROLES)


@pytest.mark.parametrize("who", ["predictor", "labeler", "operator", "auditor"])
def test_role_matrix(secured: LedgerServer, who: str) -> None:
    token, roles = TOKENS[who]
    with LedgerClient(secured.address, token=TOKENS["admin"][0], retries=0) as admin:
        pid = admin.predict("m1", [1.0, 2.0, 3.0]).prediction_id
    with LedgerClient(secured.address, token=token, retries=0) as c:
        table = calls(c, pid)
        assert set(table) == set(METHOD_ROLES)
        for rpc, call in table.items():
            needed = METHOD_ROLES[rpc]
            if needed is None or needed in roles:
                call()  # allowed: must not raise
            else:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (who, rpc)
                assert needed in err.value.details()


@pytest.mark.parametrize("token", [None, "not-a-valid-token"])
def test_missing_or_invalid_token_is_unauthenticated(secured: LedgerServer, runtime: Any, token: str | None) -> None:
    before = runtime.ledger.recorder.max_notification_id()
    with LedgerClient(secured.address, token=token, retries=0) as c:
        for rpc, call in calls(c, "x").items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
    assert runtime.ledger.recorder.max_notification_id() == before


def test_caller_identity_is_recorded(secured: LedgerServer, runtime: Any) -> None:
    import uuid

    with LedgerClient(secured.address, token=TOKENS["predictor"][0], retries=0) as c:
        pid = c.predict("m1", [1.0, 2.0, 3.0]).prediction_id
    with LedgerClient(secured.address, token=TOKENS["labeler"][0], retries=0) as c:
        c.feedback(pid, 1.0)
    prediction = runtime.ledger.get_prediction(uuid.UUID(pid))
    assert prediction.actor == "predictor"
    labeled = runtime.ledger.events.get(uuid.UUID(pid))
    assert [e.actor for e in labeled] == ["predictor", "labeler"]


def test_health_needs_no_token(secured: LedgerServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(secured.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_no_tokens_binds_loopback_only(start_server: Callable[..., LedgerServer]) -> None:
    server = start_server(host="0.0.0.0")
    assert server.host == "127.0.0.1"
