"""Batched label commits on real PostgreSQL: per-label refusals and lost races to other writers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from domain.errors import ConcurrencyError, ConflictingLabelError, InvalidArgumentError, PredictionNotFoundError
from domain.ids import new_prediction_id
from domain.ledger import LabelOutcome, LabelRequest, LabelStatus
from domain.prediction import Prediction
from domain.spec import LearnerSpec
from server.label_batches import commit_labels
from tests.factories import prediction_events

SPEC = LearnerSpec(kind="logistic", n_features=2)


def _made(rt: Any, n: int) -> list[Prediction.Made]:
    model = rt.service.register_model("m", SPEC, "alice")
    events = prediction_events(model, n)
    rt.ledger.record(events)
    return events


def _request(made: Prediction.Made, label: float) -> LabelRequest:
    return LabelRequest(made.originator_id, label, "crm", datetime.now(UTC), "nats:test")


def _labels(rt: Any, made: Prediction.Made) -> list[float]:
    return [e.label for e in rt.ledger.events.get(made.originator_id) if isinstance(e, Prediction.Labeled)]


def _race(rt: Any, monkeypatch: pytest.MonkeyPatch, rival: LabelRequest, times: int = 1) -> None:
    """Make another writer commit ``rival`` just before each of our next ``times`` commits."""
    original = rt.ledger.record
    left = [times]

    def record(events: Any) -> list[int]:
        if left[0] > 0 and events:
            left[0] -= 1
            now = datetime.now(UTC)
            (outcome,) = rt.ledger.prepare_labels([rival], received_at=now)
            if outcome.event is not None:
                original([outcome.event])
        ids: list[int] = original(events)
        return ids

    monkeypatch.setattr(rt.ledger, "record", record)


def test_each_refused_label_gets_its_own_error_and_the_rest_commit(runtime) -> None:  # type: ignore[no-untyped-def]
    rt = runtime
    p0, p1, p2 = _made(rt, 3)
    requests = [
        _request(p0, 1),
        _request(p1, 3),  # not 0/1
        LabelRequest(new_prediction_id(), 1, "crm", datetime.now(UTC), "nats:test"),
        _request(p0, 1),  # a repeat within the batch
        _request(p0, 0),  # a conflict within the batch
        _request(p2, 0),
    ]
    results = commit_labels(rt.ledger, requests, received_at=datetime.now(UTC))
    kinds = [r.status if isinstance(r, LabelOutcome) else type(r) for r in results]
    assert kinds == [
        LabelStatus.ACCEPTED,
        InvalidArgumentError,
        PredictionNotFoundError,
        LabelStatus.DUPLICATE,
        ConflictingLabelError,
        LabelStatus.ACCEPTED,
    ]
    assert (_labels(rt, p0), _labels(rt, p1), _labels(rt, p2)) == ([1.0], [], [0.0])


def test_losing_a_race_to_an_identical_label_makes_ours_a_duplicate(  # type: ignore[no-untyped-def]
    runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime
    p0, p1 = _made(rt, 2)
    _race(rt, monkeypatch, _request(p0, 1))
    results = commit_labels(rt.ledger, [_request(p0, 1), _request(p1, 0)], received_at=datetime.now(UTC))
    assert [r.status for r in results if isinstance(r, LabelOutcome)] == [LabelStatus.DUPLICATE, LabelStatus.ACCEPTED]
    assert (_labels(rt, p0), _labels(rt, p1)) == ([1.0], [0.0])


def test_losing_a_race_to_a_different_label_refuses_ours_and_commits_the_rest(  # type: ignore[no-untyped-def]
    runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime
    p0, p1 = _made(rt, 2)
    _race(rt, monkeypatch, _request(p0, 0))
    first, second = commit_labels(rt.ledger, [_request(p0, 1), _request(p1, 0)], received_at=datetime.now(UTC))
    assert isinstance(first, ConflictingLabelError)
    assert isinstance(second, LabelOutcome) and second.status is LabelStatus.ACCEPTED
    assert (_labels(rt, p0), _labels(rt, p1)) == ([0.0], [0.0])


def test_a_writer_that_keeps_winning_is_reported_not_retried_forever(  # type: ignore[no-untyped-def]
    runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime
    made = _made(rt, 3)
    rivals = iter(made)
    original = rt.ledger.record

    def record(events: Any) -> list[int]:
        # Each attempt, another writer labels the next prediction of the batch first.
        rival = next(rivals, None)
        if rival is not None and events:
            now = datetime.now(UTC)
            (outcome,) = rt.ledger.prepare_labels([_request(rival, 1)], received_at=now)
            original([outcome.event])
        ids: list[int] = original(events)
        return ids

    monkeypatch.setattr(rt.ledger, "record", record)
    with pytest.raises(ConcurrencyError):
        commit_labels(rt.ledger, [_request(m, 1) for m in made], received_at=datetime.now(UTC), attempts=2)
    assert [_labels(rt, m) for m in made] == [[1.0], [1.0], []]
