"""One server interceptor for RPC metrics, request ids and RPC log lines.

Every RPC gets a request id (the caller's ``x-request-id`` metadata if it sent a usable
one, else a new one), set as the context's ``server.logs.request_id`` while the handler
runs and returned in the trailing metadata. On completion the call is counted by
method and status code and its duration observed; streaming RPCs are counted once, when
the stream ends. A failed RPC logs one line (status, message, request id); at DEBUG
every RPC does.

It must sit first in the server's interceptor list, so it also sees the calls the auth
interceptor refuses (UNAUTHENTICATED, PERMISSION_DENIED).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from server.logs import request_id
from server.metrics import LedgerMetrics

log = logging.getLogger("learnledger.rpc")

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128
# Codes that say the server (not the caller) has a problem: logged as warnings.
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

# New ids: a random per-process prefix and a counter. Unique for the process's life and,
# by the 48 random bits, across replicas; ~10x cheaper than uuid4 (no syscall per call).
_PREFIX = os.urandom(6).hex()
_counter = itertools.count(1)


def new_request_id() -> str:
    """A fresh request id, e.g. ``3f9a0c1b2d4e-1a``."""
    return f"{_PREFIX}-{next(_counter):x}"


def _request_id_from(metadata: Iterable[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            # A caller's id goes into log lines and trailers: printable and short, or ignored.
            if isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isprintable():
                return value
            break
    return new_request_id()


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts, times and logs every RPC, and gives it a request id.

    Metric children are cached per (method, code): ``Counter.labels`` takes a lock and
    builds a key on every call, the cache is one dict read.
    """

    def __init__(self, metrics: LedgerMetrics):
        self.metrics = metrics
        self._counters: dict[tuple[str, str, grpc.StatusCode], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the handler of this call (None, an unknown method, passes through)."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        path: str = handler_call_details.method  # type: ignore[attr-defined]
        service, _, method = path.lstrip("/").rpartition("/")
        rid = _request_id_from(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        return _wrap(handler, _Call(self, service, method, rid))

    def _finish(self, call: _Call, code: grpc.StatusCode, context: grpc.ServicerContext, seconds: float) -> None:
        key = (call.service, call.method, code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.rpc_requests.labels(call.service, call.method, code.name)
        counter.inc()
        histogram = self._histograms.get(key[:2])
        if histogram is None:
            histogram = self._histograms[key[:2]] = self.metrics.rpc_latency.labels(call.service, call.method)
        histogram.observe(seconds)
        if code is grpc.StatusCode.OK:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("rpc %s OK in %.2f ms", call.method, seconds * 1e3, extra=call.extra(code, seconds))
            return
        details = context.details()
        message = details.decode(errors="replace") if isinstance(details, bytes) else str(details or "")
        level = logging.WARNING if code in SERVER_FAULTS else logging.INFO
        extra = call.extra(code, seconds)
        extra["status_message"] = message
        log.log(level, "rpc %s failed: %s %s", call.method, code.name, message, extra=extra)


class _Call:
    """What the wrapper needs to know about one call."""

    __slots__ = ("interceptor", "method", "request_id", "service")

    def __init__(self, interceptor: MetricsInterceptor, service: str, method: str, rid: str):
        self.interceptor = interceptor
        self.service = service
        self.method = method
        self.request_id = rid

    def extra(self, code: grpc.StatusCode, seconds: float) -> dict[str, Any]:
        """The structured fields of this call's log line."""
        return {
            "rpc": self.method,
            "service": self.service,
            "code": code.name,
            "request_id": self.request_id,
            "duration_ms": round(seconds * 1e3, 3),
        }


def _outcome(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    # abort() and set_code() leave the code on the context; an exception that escapes
    # without one is reported by gRPC as UNKNOWN.
    code = context.code()
    if code is None:
        return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
    return code  # type: ignore[no-any-return]


def _wrap(handler: grpc.RpcMethodHandler, call: _Call) -> grpc.RpcMethodHandler:
    finish = call.interceptor._finish
    trailer = ((REQUEST_ID_KEY, call.request_id),)

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            token = request_id.set(call.request_id)
            context.set_trailing_metadata(trailer)
            started = time.perf_counter()
            failed = False
            try:
                return behaviour(request, context)
            except BaseException:
                failed = True
                raise
            finally:
                finish(call, _outcome(context, failed), context, time.perf_counter() - started)
                request_id.reset(token)

        return run

    def streaming(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = request_id.set(call.request_id)
            context.set_trailing_metadata(trailer)
            started = time.perf_counter()
            code: grpc.StatusCode | None = None
            try:
                yield from behaviour(request, context)
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED  # the caller went away mid-stream
                raise
            except BaseException:
                code = _outcome(context, True)
                raise
            finally:
                finish(call, code or _outcome(context, False), context, time.perf_counter() - started)
                # A generator closed by the collector runs this in another context.
                with contextlib.suppress(ValueError):
                    request_id.reset(token)

        return run

    h: Any = handler
    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(h.unary_unary), h.request_deserializer, h.response_serializer)
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            unary(h.stream_unary), h.request_deserializer, h.response_serializer
        )
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            streaming(h.unary_stream), h.request_deserializer, h.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        streaming(h.stream_stream), h.request_deserializer, h.response_serializer
    )
