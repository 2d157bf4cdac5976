"""JSON log lines, and the request id an RPC carries into its log line and trailing metadata."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any
from uuid import UUID

import grpc
import orjson
import pytest

from server.logs import JsonFormatter, configure_logging, request_id
from server.metrics import LedgerMetrics
from server.metrics_interceptor import MetricsInterceptor

PID = UUID("01890000-0000-7000-8000-000000000001")


def record(message: str, *args: Any, level: int = logging.INFO, **extra: Any) -> logging.LogRecord:
    """A log record as ``logger.log(level, message, *args, extra=extra)`` makes it."""
    logger = logging.getLogger("test.json")
    return logger.makeRecord(logger.name, level, __file__, 1, message, args, None, extra=extra)


def test_formatter_writes_one_json_object_with_extras() -> None:
    line = JsonFormatter().format(
        record("predicted %d", 3, request_id="r-1", prediction_id=PID, model="m1", rpc="Predict", score=0.25)
    )
    assert "\n" not in line
    data = orjson.loads(line)
    assert data["level"] == "INFO" and data["logger"] == "test.json" and data["message"] == "predicted 3"
    assert data["time"].endswith("+00:00")
    assert (data["request_id"], data["prediction_id"], data["model"], data["rpc"]) == ("r-1", str(PID), "m1", "Predict")
    assert data["score"] == 0.25
    assert "args" not in data and "msg" not in data  # the record's own fields stay out


def test_formatter_takes_the_current_request_id_and_exceptions() -> None:
    token = request_id.set("ctx-9")
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            rec = record("failed", level=logging.ERROR)
            rec.exc_info = sys.exc_info()
        data = orjson.loads(JsonFormatter().format(rec))
    finally:
        request_id.reset(token)
    assert data["request_id"] == "ctx-9"
    assert "ValueError: boom" in data["exception"]
    # Outside an RPC there is none, and values orjson does not know are written as text
    data = orjson.loads(JsonFormatter().format(record("x", thing=object())))
    assert "request_id" not in data and data["thing"].startswith("<object object")


def test_configure_logging_json_lines() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        configure_logging("json", stream=out)
        logging.getLogger("test.configured").info("hello", extra={"model": "m1"})
        with pytest.raises(ValueError):
            configure_logging("yaml")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    data = orjson.loads(out.getvalue().splitlines()[0])
    assert (data["message"], data["model"]) == ("hello", "m1")


# --- the interceptor on a minimal real gRPC server (no database) -------------------------------


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    logging.getLogger("test.handler").info("handled")  # request id from the context
    return request


@pytest.fixture
def rpc_server() -> Iterator[tuple[str, LedgerMetrics]]:
    """A gRPC server with one raw-bytes method ``/t.Echo/Call`` behind the metrics interceptor."""
    metrics = LedgerMetrics()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[MetricsInterceptor(metrics)])
    handler = grpc.method_handlers_generic_handler("t.Echo", {"Call": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", metrics
    server.stop(None)


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """JSON lines of the ``learnledger.rpc`` and ``test.handler`` loggers, at DEBUG."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger("learnledger.rpc"), logging.getLogger("test.handler")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield out
    for lg, level in zip(loggers, saved, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_request_id_comes_back_and_is_in_the_failed_rpc_log_line(
    rpc_server: tuple[str, LedgerMetrics], json_lines: io.StringIO
) -> None:
    address, metrics = rpc_server
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/t.Echo/Call")
        # When a call fails with the caller's request id
        with pytest.raises(grpc.RpcError) as failed:
            call(b"missing", metadata=(("x-request-id", "req-7"),), timeout=10)
        # And another succeeds without one
        reply, ok = call.with_call(b"hi", timeout=10)
    # Then the failure carries the id back, and its one log line has status, message and id
    assert failed.value.code() is grpc.StatusCode.NOT_FOUND
    assert ("x-request-id", "req-7") in failed.value.trailing_metadata()
    lines = [orjson.loads(line) for line in json_lines.getvalue().splitlines()]
    failures = [x for x in lines if x["logger"] == "learnledger.rpc" and x["code"] != "OK"]
    assert len(failures) == 1
    assert failures[0]["request_id"] == "req-7" and failures[0]["code"] == "NOT_FOUND"
    assert failures[0]["status_message"] == "no such thing" and failures[0]["level"] == "INFO"
    assert failures[0]["rpc"] == "Call" and "NOT_FOUND" in failures[0]["message"]
    # And the successful call got a fresh id, seen by the handler's own line and the DEBUG RPC line
    assert reply == b"hi"
    fresh = dict(ok.trailing_metadata())["x-request-id"]
    assert fresh and fresh != "req-7"
    handled = [x for x in lines if x["logger"] == "test.handler"]
    assert [x["request_id"] for x in handled] == [fresh]
    debug = [x for x in lines if x["logger"] == "learnledger.rpc" and x["code"] == "OK"]
    assert [(x["level"], x["request_id"]) for x in debug] == [("DEBUG", fresh)]
    # And both calls were counted under their codes
    for code in ("NOT_FOUND", "OK"):
        labels = {"service": "t.Echo", "method": "Call", "code": code}
        assert metrics.registry.get_sample_value("learnledger_rpc_requests_total", labels) == 1


def test_unusable_request_ids_are_replaced(rpc_server: tuple[str, LedgerMetrics]) -> None:
    address, _ = rpc_server
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/t.Echo/Call")
        _, ok = call.with_call(b"x", metadata=(("x-request-id", "a" * 500),), timeout=10)
    returned = dict(ok.trailing_metadata())["x-request-id"]
    assert returned != "a" * 500 and len(returned) < 40
