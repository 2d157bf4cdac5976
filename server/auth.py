"""Bearer-token authentication and role checks, as one server interceptor.

The caller's identity (the token's name) is made available to the servicer through
``current_caller()`` and recorded as the ``actor`` of every event the call causes.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ROLES = ("predict", "feedback", "operate", "audit")
ANONYMOUS = "anonymous"
SERVICE = "learnledger.v1.Ledger"

# Which role each RPC needs. ``None``: any authenticated caller (reading a model's
# shape is needed by every client). RPCs missing here are refused, never let through.
METHOD_ROLES: dict[str, str | None] = {
    "RegisterModel": "operate",
    "GetModel": None,
    "ListModels": None,
    "Predict": "predict",
    "PredictBatch": "predict",
    "Feedback": "feedback",
    "FeedbackStream": "feedback",
    "FeedbackBatchStream": "feedback",
    "ListVersions": "audit",
    "GetState": "audit",
    "VerifyAudit": "audit",
    "Explain": "audit",
    "WatchModel": "audit",
    "Rollback": "operate",
    "Pause": "operate",
    "Resume": "operate",
    "Rebaseline": "operate",
    "AbortRollout": "operate",
}


class TokenFileError(Exception):
    """The tokens file cannot be read or is malformed."""


@dataclass(frozen=True)
class Caller:
    """Who is calling, and what they may do."""

    name: str
    roles: frozenset[str]


ANONYMOUS_CALLER = Caller(ANONYMOUS, frozenset(ROLES))
_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("learnledger_caller", default=ANONYMOUS_CALLER)


def current_caller() -> Caller:
    """The authenticated caller of the RPC running on this thread."""
    return _caller.get()


class TokenTable:
    """Tokens by their SHA-256, so lookups do not compare secrets byte by byte."""

    def __init__(self, entries: Iterable[tuple[str, Caller]]):
        self._by_hash: dict[bytes, tuple[str, Caller]] = {}
        for token, caller in entries:
            self._by_hash[hashlib.sha256(token.encode()).digest()] = (token, caller)

    def lookup(self, token: str) -> Caller | None:
        """The caller a token names, or None."""
        found = self._by_hash.get(hashlib.sha256(token.encode()).digest())
        if found is None or not hmac.compare_digest(found[0].encode(), token.encode()):
            return None
        return found[1]

    def __len__(self) -> int:
        return len(self._by_hash)


def load_tokens(path: Path) -> TokenTable:
    """Read ``{"tokens": [{"token": ..., "name": ..., "roles": [...]}]}``.

    Raises:
        TokenFileError: unreadable file, bad JSON, an empty or duplicate token, an
            unknown role.
    """
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise TokenFileError(f"cannot read tokens file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise TokenFileError(f"tokens file {path} is not valid JSON: {exc}") from None
    items = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise TokenFileError(f'tokens file {path} must hold {{"tokens": [...]}}')
    entries: list[tuple[str, Caller]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TokenFileError(f"tokens[{i}] must be an object")
        token, name, roles = item.get("token"), item.get("name"), item.get("roles", [])
        if not isinstance(token, str) or len(token) < 8:
            raise TokenFileError(f"tokens[{i}].token must be a string of at least 8 characters")
        if token in seen:
            raise TokenFileError(f"tokens[{i}].token is listed twice")
        if not isinstance(name, str) or not name:
            raise TokenFileError(f"tokens[{i}].name must be a non-empty string")
        if not isinstance(roles, list) or any(r not in ROLES for r in roles):
            raise TokenFileError(f"tokens[{i}].roles must be a list drawn from {', '.join(ROLES)}")
        seen.add(token)
        entries.append((token, Caller(name, frozenset(roles))))
    return TokenTable(entries)


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every Ledger RPC and checks its role; other services pass (health).

    With ``tokens=None`` authentication is off and every call runs as ``anonymous``
    with every role (the server then binds to loopback only).
    """

    def __init__(self, tokens: TokenTable | None):
        self.tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the handler so that the check and the identity run on the handler's thread."""
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        service, _, rpc = method.lstrip("/").partition("/")
        if handler is None or service != SERVICE:
            return handler
        caller, refusal = self.authorise(rpc, handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        return _wrap(handler, caller, refusal)

    def authorise(
        self, rpc: str, metadata: Iterable[tuple[str, Any]] | None
    ) -> tuple[Caller, tuple[grpc.StatusCode, str] | None]:
        """Who calls ``rpc`` of the Ledger service, and why the call is refused (None: allowed).

        Pure: the caller applies the refusal (``context.abort``) and the identity
        (``run_as``) on the thread that runs the handler.
        """
        if rpc not in METHOD_ROLES:
            return ANONYMOUS_CALLER, (grpc.StatusCode.PERMISSION_DENIED, f"{rpc} has no role assigned")
        if self.tokens is None:
            return ANONYMOUS_CALLER, None
        token = _bearer(metadata)
        if token is None:
            return ANONYMOUS_CALLER, (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token: send metadata 'authorization: Bearer <token>'",
            )
        caller = self.tokens.lookup(token)
        if caller is None:
            return ANONYMOUS_CALLER, (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        role = METHOD_ROLES[rpc]
        if role is not None and role not in caller.roles:
            denied = f"{caller.name!r} lacks the {role!r} role needed by {rpc}"
            return caller, (grpc.StatusCode.PERMISSION_DENIED, denied)
        return caller, None


def set_caller(caller: Caller) -> contextvars.Token[Caller]:
    """Make ``caller`` the ``current_caller()`` of this context; undo with ``reset_caller``."""
    return _caller.set(caller)


def reset_caller(token: contextvars.Token[Caller]) -> None:
    """Undo a ``set_caller``."""
    _caller.reset(token)


def _wrap(
    handler: grpc.RpcMethodHandler, caller: Caller, refusal: tuple[grpc.StatusCode, str] | None
) -> grpc.RpcMethodHandler:
    def guard(behaviour: Callable[..., Any], streaming_response: bool) -> Callable[..., Any]:
        if streaming_response:

            def stream(request: Any, context: grpc.ServicerContext) -> Any:
                if refusal is not None:
                    context.abort(*refusal)
                token = _caller.set(caller)
                try:
                    yield from behaviour(request, context)
                finally:
                    _caller.reset(token)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            if refusal is not None:
                context.abort(*refusal)
            token = _caller.set(caller)
            try:
                return behaviour(request, context)
            finally:
                _caller.reset(token)

        return unary

    h: Any = handler
    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            guard(h.unary_unary, False), h.request_deserializer, h.response_serializer
        )
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            guard(h.unary_stream, True), h.request_deserializer, h.response_serializer
        )
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            guard(h.stream_unary, False), h.request_deserializer, h.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        guard(h.stream_stream, True), h.request_deserializer, h.response_serializer
    )
