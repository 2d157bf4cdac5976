"""Group commit under contention: racing requests are isolated, re-validated, and never lost."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from server.client import LedgerClient
from server.grpc_server import LedgerServer


def test_racing_identical_labels_commit_once(
    server: LedgerServer, client: LedgerClient, registered: str, runtime: Any
) -> None:
    pid = client.predict(registered, [1.0, 2.0, 3.0]).prediction_id
    before = runtime.ledger.recorder.max_notification_id()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: client.feedback(pid, 1.0), range(32)))
    assert sorted(set(statuses)) == ["ACCEPTED", "DUPLICATE"] and statuses.count("ACCEPTED") == 1
    assert runtime.ledger.recorder.max_notification_id() == before + 1


def test_racing_conflicting_labels_one_wins(server: LedgerServer, client: LedgerClient, registered: str) -> None:
    pid = client.predict(registered, [1.0, 2.0, 3.0]).prediction_id

    def label(i: int) -> str:
        try:
            return client.feedback(pid, float(i % 2))
        except grpc.RpcError as exc:
            return exc.code().name

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(label, range(32)))
    assert outcomes.count("ACCEPTED") == 1
    assert set(outcomes) <= {"ACCEPTED", "DUPLICATE", "ALREADY_EXISTS"}
    assert "ALREADY_EXISTS" in outcomes


def test_racing_same_key_predictions_make_one(
    server: LedgerServer, client: LedgerClient, registered: str, runtime: Any
) -> None:
    before = runtime.ledger.recorder.max_notification_id()
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: client.predict(registered, [1.0, 2.0, 3.0], prediction_id="k"), range(32)))
    assert len({r.prediction_id for r in replies}) == 1
    assert runtime.ledger.recorder.max_notification_id() == before + 1


def test_many_concurrent_predictions_share_transactions(
    server: LedgerServer, client: LedgerClient, registered: str, runtime: Any
) -> None:
    stats = server.writer.stats
    tx_before = stats.transactions
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda i: client.predict(registered, [float(i), 0.0, 1.0]), range(640)))
    found = runtime.ledger.get_predictions(uuid.UUID(r.prediction_id) for r in replies)
    assert len(found) == 640  # every acknowledged prediction is in the log
    assert stats.transactions - tx_before < 640  # and they were group-committed
