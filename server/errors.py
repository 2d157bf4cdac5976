"""The one place that maps domain errors to gRPC status codes (STYLE.md §9)."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import grpc
from eventsourcing.persistence import InterfaceError, OperationalError

from domain.errors import (
    AlreadyExistsError,
    ConcurrencyError,
    FailedPreconditionError,
    InvalidArgumentError,
    LedgerError,
    NotFoundError,
)
from projections.replay import ReplayError
from server.writer import WriterClosedError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Most specific first: the first matching class wins.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConcurrencyError, grpc.StatusCode.ABORTED),
    # The log cannot be folded back into what it recorded (a replayed score or digest
    # differs): corruption or tampering, which a retry cannot fix.
    (ReplayError, grpc.StatusCode.DATA_LOSS),
    # Not domain errors, but transient by nature: the client's retry is the right answer.
    (WriterClosedError, grpc.StatusCode.UNAVAILABLE),
    (OperationalError, grpc.StatusCode.UNAVAILABLE),
    (InterfaceError, grpc.StatusCode.UNAVAILABLE),
)


class ResourceExhaustedError(LedgerError):
    """A request is larger than the server accepts (too many rows, too many labels)."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception raised by a use case (INTERNAL when unknown)."""
    if isinstance(exc, ResourceExhaustedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def message_for(exc: BaseException, code: grpc.StatusCode) -> str:
    """The message a caller sees: the domain's own words, never internals."""
    if code is grpc.StatusCode.INTERNAL:
        return "internal error; the server log has the details"
    return str(exc) or type(exc).__name__


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=exc)
    context.abort(code, message_for(exc, code))


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises a bare Exception after setting the status; let it through.
    return type(exc) is Exception and not exc.args


def map_errors(method: F) -> F:
    """Decorate a servicer method: domain errors become status codes, never OK replies.

    Works for unary and client-streaming methods (a return value) and server-streaming
    methods (a generator). Anything that is not a known error is logged and becomes
    ``INTERNAL`` with a generic message.
    """
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                if _is_abort(exc):
                    raise
                _abort(context, exc, name)

        return cast(F, stream_wrapper)

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            _abort(context, exc, name)

    return cast(F, wrapper)
