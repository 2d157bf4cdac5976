"""Fixtures for the end-to-end gRPC tests: a real in-process server on a free port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from server.auth import Caller, TokenTable
from server.client import LedgerClient
from server.grpc_server import LedgerServer, ServerSettings, build_server

TOKENS = {
    "predictor": ("tok-predict-0001", {"predict"}),
    "labeler": ("tok-feedback-001", {"feedback"}),
    "operator": ("tok-operate-0001", {"operate"}),
    "auditor": ("tok-audit-00001", {"audit"}),
    "admin": ("tok-admin-000001", {"predict", "feedback", "operate", "audit"}),
}
SPEC: dict[str, Any] = {"kind": "logistic", "n_features": 3, "batch_size": 4, "learning_rate": 0.1}


def token_table() -> TokenTable:
    """The test tokens: one per role, and an admin with every role."""
    return TokenTable((token, Caller(name, frozenset(roles))) for name, (token, roles) in TOKENS.items())


@pytest.fixture
def start_server(runtime: Any) -> Iterator[Callable[..., LedgerServer]]:
    """Start servers over the test's runtime; every one started is stopped afterwards."""
    started: list[LedgerServer] = []

    def start(**overrides: Any) -> LedgerServer:
        settings = ServerSettings(**{"port": 0, "workers": 32, **overrides})
        server = build_server(runtime.service, settings)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=2.0)


@pytest.fixture
def server(start_server: Callable[..., LedgerServer]) -> LedgerServer:
    """A server without authentication (loopback)."""
    return start_server()


@pytest.fixture
def client(server: LedgerServer) -> Iterator[LedgerClient]:
    """A client of ``server``."""
    with LedgerClient(server.address, retries=0) as c:
        yield c


@pytest.fixture
def registered(client: LedgerClient) -> str:
    """A registered 3-feature logistic model with batch size 4; its name."""
    client.register_model("m1", SPEC)
    return "m1"
