"""The Explain RPC: a served decision re-derived by replay, through a real server."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from server.client import Label, LedgerClient


def test_explain_rebuilds_the_serving_version_and_matches_the_logged_score(
    client: LedgerClient, registered: str
) -> None:
    served = client.predict_batch(registered, [[float(i), 1.0 - i, 0.5 * i] for i in range(8)])
    client.feedback_stream([Label(p.prediction_id, float(i % 2)) for i, p in enumerate(served)], per_message=8)
    deadline = time.monotonic() + 10
    while client.get_model(registered).version < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    later = client.predict(registered, [0.3, -1.2, 2.0])
    assert later.model_version >= 2
    reply = client.explain(later.prediction_id)
    assert reply.model == registered and reply.model_version == later.model_version
    assert reply.params_digest == later.params_digest
    assert reply.recomputed_score == pytest.approx(later.score, abs=1e-6) and reply.score == later.score
    assert 1 <= len(reply.top_reasons) <= 4
    report = json.loads(reply.report_json)
    assert report["decision"]["score_matches"] is True


@pytest.mark.parametrize(
    ("pid", "code"),
    [
        ("0190c0de-0000-7000-8000-000000000000", grpc.StatusCode.NOT_FOUND),
        ("not-a-uuid", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_explain_refuses_unknown_and_malformed_ids(
    client: LedgerClient, registered: str, pid: str, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.explain(pid)
    assert err.value.code() == code  # type: ignore[attr-defined]
