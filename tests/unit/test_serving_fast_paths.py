"""The serving hot path's shortcuts give exactly what the plain constructions give."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import numpy as np
import pytest

from domain.errors import ConcurrencyError
from domain.ids import new_prediction_id, new_prediction_ids
from domain.ledger import LabelOutcome, LabelStatus, _outcome
from domain.prediction import Prediction, make_label_event, make_prediction_event
from domain.spec import LearnerSpec
from learnledger.v1 import ledger_pb2 as pb
from projections.learning import LabeledExample
from server.learner_loop import _example
from server.servicer import predict_batch_bytes, predict_batch_response
from server.serving import Predictions, RecentPredictions
from server.writer import GroupCommitWriter


def test_bulk_ids_are_ordered_unique_uuid7() -> None:
    ids = [*new_prediction_ids(300), new_prediction_id(), *new_prediction_ids(5)]
    assert sorted(ids) == ids and len(set(ids)) == len(ids)
    for u in ids:
        assert UUID(str(u)) == u and u.version == 7 and hash(u) == hash(UUID(int=u.int))
    assert new_prediction_ids(0) == []


@pytest.mark.parametrize("n", [1, 3, 256])
@pytest.mark.parametrize("version", [0, 1, 127, 128, 300_000])
def test_pre_encoded_batch_reply_equals_the_message(n: int, version: int) -> None:
    rng = np.random.default_rng(n)
    scores = rng.random(n).tolist()
    scores[0] = 0.0
    out = Predictions(new_prediction_ids(n), scores, [float(s >= 0.5) for s in scores], version, "sha256:" + "ab" * 32)
    parsed = pb.PredictBatchResponse.FromString(predict_batch_bytes(out))
    assert parsed == predict_batch_response(out)
    assert [r.prediction_id for r in parsed.results] == [str(i) for i in out.ids]


def test_pre_encoded_batch_reply_with_mixed_versions_falls_back() -> None:
    out = Predictions(new_prediction_ids(2), [0.1, 0.9], [0.0, 1.0], [3, 4], ["sha256:a", "sha256:b"])
    assert pb.PredictBatchResponse.FromString(predict_batch_bytes(out)) == predict_batch_response(out)


def test_fast_built_values_equal_constructed_ones() -> None:
    pid = uuid4()
    assert _outcome(pid, LabelStatus.LATE, None) == LabelOutcome(pid, LabelStatus.LATE, None)
    served = ((1.0, 2.0), 0.7, 1.0, "control")
    assert _example(pid, served, 1.0) == LabeledExample(pid, (1.0, 2.0), 1.0, 0.0, 0.7, 1.0, "control")


def _made(pid: UUID, model_id: UUID, now: datetime) -> Prediction.Made:
    spec = LearnerSpec.from_dict({"kind": "logistic", "n_features": 2})
    return make_prediction_event(
        pid,
        model_id=model_id,
        model_name="m",
        model_version=1,
        spec=spec,
        features=(1.0, 2.0),
        score=0.5,
        decision=1.0,
        params_digest="d",
        routing="champion",
        actor="a",
        timestamp=now,
    )


def test_recent_predictions_forget_labeled_ones_and_roll_generations() -> None:
    recent = RecentPredictions(size=4)
    model_id, now = uuid4(), datetime.now(UTC)
    ids = new_prediction_ids(6)
    recent.on_commit([_made(p, model_id, now) for p in ids[:3]], [])
    found = recent.lookup(ids)
    assert set(found) == set(ids[:3]) and found[ids[0]].model_id == model_id and found[ids[0]].timestamp == now
    label = make_label_event(
        ids[0], model_id=model_id, label=1.0, source="", event_time=now, in_window=True, actor="a", timestamp=now
    )
    recent.on_commit([label], [])
    assert set(recent.lookup(ids)) == set(ids[1:3])
    recent.on_commit([_made(p, model_id, now) for p in ids[3:]], [])  # young reaches 4: becomes old
    assert set(recent.lookup(ids)) == set(ids[1:])
    recent.forget([ids[1]])
    assert set(recent.lookup(ids)) == set(ids[2:])


@dataclass
class _Event:
    originator_id: UUID
    originator_version: int


class _FakeLedger:
    """Records transactions; a taken (id, version) fails the whole one, like the primary key."""

    def __init__(self) -> None:
        self.transactions: list[list[Any]] = []
        self.taken: set[tuple[UUID, int]] = set()

    def encode_rows(self, events: list[Any]) -> None:
        return None  # like a recorder without a row fast path: record() gets the events

    def record(self, events: list[Any]) -> list[int]:
        keys = [(e.originator_id, e.originator_version) for e in events]
        if len(set(keys)) != len(keys) or self.taken.intersection(keys):
            raise ConcurrencyError("taken")
        self.taken.update(keys)
        self.transactions.append(list(events))
        return list(range(len(events)))


def test_contended_submissions_for_one_position_never_share_a_transaction() -> None:
    ledger = _FakeLedger()
    writer = GroupCommitWriter(ledger)  # type: ignore[arg-type]
    key, other = uuid4(), uuid4()
    first = writer.submit([_Event(key, 2)], contended=True)
    second = writer.submit([_Event(key, 2)], contended=True)
    third = writer.submit([_Event(other, 2)], contended=True)
    writer.start()  # all three are queued: the first transaction sees them together
    assert first.result(5) == [0] and third.result(5) == [1]
    with pytest.raises(ConcurrencyError):
        second.result(5)
    writer.close()
    # The loser failed without a transaction of its own (no rolled-back insert).
    assert [[e.originator_id for e in t] for t in ledger.transactions] == [[key, other]]
