"""Every bad input gets a precise status and message, and writes nothing to the log."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from learnledger.v1 import ledger_pb2 as pb
from server.client import LedgerClient


def assert_refused(runtime: Any, call: Callable[[], object], code: grpc.StatusCode, words: str) -> None:
    """``call`` fails with ``code`` and a message containing ``words``; the log is unchanged."""
    before = runtime.ledger.recorder.max_notification_id()
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()
    assert runtime.ledger.recorder.max_notification_id() == before


def test_unknown_model_is_not_found(client: LedgerClient, runtime: Any) -> None:
    assert_refused(
        runtime, lambda: client.predict("nope", [1.0, 2.0, 3.0]), grpc.StatusCode.NOT_FOUND, "no model named 'nope'"
    )
    assert_refused(runtime, lambda: client.get_model("nope"), grpc.StatusCode.NOT_FOUND, "nope")
    assert_refused(runtime, lambda: client.get_state("nope", version=1), grpc.StatusCode.NOT_FOUND, "nope")


@pytest.mark.parametrize(
    ("features", "words"),
    [
        ([1.0, 2.0], "expects 3 features, got 2"),
        ([1.0, math.nan, 3.0], "feature 1 is nan"),
        ([math.inf, 0.0, 0.0], "feature 0 is inf"),
        ([], "expects 3 features, got 0"),
    ],
)
def test_bad_features_are_invalid_argument(
    client: LedgerClient, registered: str, runtime: Any, features: list[float], words: str
) -> None:
    assert_refused(runtime, lambda: client.predict(registered, features), grpc.StatusCode.INVALID_ARGUMENT, words)


def test_one_bad_row_refuses_the_whole_batch(client: LedgerClient, registered: str, runtime: Any) -> None:
    rows = [[1.0, 2.0, 3.0]] * 10 + [[1.0, math.nan, 3.0]]
    assert_refused(
        runtime, lambda: client.predict_batch(registered, rows), grpc.StatusCode.INVALID_ARGUMENT, "feature 1 is nan"
    )


def test_feedback_for_unknown_prediction_is_not_found(client: LedgerClient, registered: str, runtime: Any) -> None:
    assert_refused(
        runtime, lambda: client.feedback("never-predicted", 1.0), grpc.StatusCode.NOT_FOUND, "no prediction with id"
    )


def test_conflicting_label_is_already_exists_and_identical_repeat_is_duplicate(
    client: LedgerClient, registered: str, runtime: Any
) -> None:
    p = client.predict(registered, [1.0, 2.0, 3.0])
    assert client.feedback(p.prediction_id, 1.0) == "ACCEPTED"
    assert_refused(
        runtime,
        lambda: client.feedback(p.prediction_id, 0.0),
        grpc.StatusCode.ALREADY_EXISTS,
        "labeled 1 already; refusing 0",
    )
    before = runtime.ledger.recorder.max_notification_id()
    assert client.feedback(p.prediction_id, 1.0) == "DUPLICATE"
    assert runtime.ledger.recorder.max_notification_id() == before


def test_bad_label_value_is_invalid_argument(client: LedgerClient, registered: str, runtime: Any) -> None:
    p = client.predict(registered, [1.0, 2.0, 3.0])
    assert_refused(
        runtime, lambda: client.feedback(p.prediction_id, 0.5), grpc.StatusCode.INVALID_ARGUMENT, "labels 0 or 1"
    )
    assert_refused(
        runtime, lambda: client.feedback(p.prediction_id, math.nan), grpc.StatusCode.INVALID_ARGUMENT, "finite"
    )


def test_prediction_id_reused_with_other_features_is_already_exists(
    client: LedgerClient, registered: str, runtime: Any
) -> None:
    client.predict(registered, [1.0, 2.0, 3.0], prediction_id="key-1")
    assert_refused(
        runtime,
        lambda: client.predict(registered, [1.0, 2.0, 4.0], prediction_id="key-1"),
        grpc.StatusCode.ALREADY_EXISTS,
        "different features",
    )
    rows = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    assert_refused(
        runtime,
        lambda: client.predict_batch(registered, rows, prediction_ids=["k2", "k2"]),
        grpc.StatusCode.ALREADY_EXISTS,
        "twice",
    )


def test_oversized_message_is_resource_exhausted(client: LedgerClient, registered: str, runtime: Any) -> None:
    huge = [0.5] * (600 * 1024)  # ~4.9 MB of doubles, over the 4 MiB limit
    stub = client.stub
    request = pb.PredictRequest(model=registered, features=huge)
    before = runtime.ledger.recorder.max_notification_id()
    with pytest.raises(grpc.RpcError) as err:
        # Sent with the raw stub: the client's own send limit would refuse it locally.
        stub.Predict(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert runtime.ledger.recorder.max_notification_id() == before


def test_too_many_rows_is_resource_exhausted(client: LedgerClient, registered: str, runtime: Any) -> None:
    rows = [[1.0, 2.0, 3.0]] * 10_001
    assert_refused(
        runtime,
        lambda: client.predict_batch(registered, rows),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "at most 10000 rows",
    )


def test_bad_spec_and_duplicate_model(client: LedgerClient, registered: str, runtime: Any) -> None:
    assert_refused(
        runtime,
        lambda: client.register_model("m2", {"kind": "tree", "n_features": 3}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "learner kind",
    )
    assert_refused(
        runtime,
        lambda: client.register_model(registered, {"kind": "logistic", "n_features": 3}),
        grpc.StatusCode.ALREADY_EXISTS,
        "registered already",
    )
    assert_refused(
        runtime, lambda: client.rollback(registered, 5, "x"), grpc.StatusCode.INVALID_ARGUMENT, "rollback target"
    )
