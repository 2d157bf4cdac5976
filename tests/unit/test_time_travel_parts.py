"""Pure parts of the time-travel audits: the Branch aggregate, the taint rule, weight names."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest

from domain.branch import Branch, branch_id_for, branch_name, excluded_digest
from domain.errors import InvalidArgumentError
from domain.mapping import OrjsonTranscoder, TypedMapper
from domain.model import Model
from domain.spec import LearnerSpec
from projections.impact import tainted_versions
from projections.refold import param_layout

MAPPER = TypedMapper(OrjsonTranscoder())
WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def _branch() -> Branch:
    ids = [uuid4(), uuid4()]
    digest = excluded_digest(ids)
    model_id = uuid4()
    return Branch(
        model_id=model_id,
        name=branch_name("source=crm", 3, digest),
        from_version=3,
        rule="source=crm",
        excluded_count=2,
        excluded_digest=digest,
        actor="auditor",
    )


def test_branch_events_round_trip_exactly() -> None:
    branch = _branch()
    branch.record_replay(10, 7, 2, 1, "sha256:" + "ab" * 32, 5, "auditor")
    events = branch.collect_events()
    assert [type(e).__name__ for e in events] == ["Created", "Replayed"]
    for event in events:
        assert MAPPER.to_domain_event(MAPPER.to_stored_event(event)) == event
    assert branch.id == branch_id_for(branch.model_id, branch.name)
    assert branch.replays == 1 and branch.final_digest == "sha256:" + "ab" * 32


def test_a_replay_cannot_end_before_the_branch_point() -> None:
    branch = _branch()
    with pytest.raises(InvalidArgumentError):
        branch.record_replay(2, 0, 0, 0, "sha256:x", 0, "auditor")


def test_the_excluded_digest_ignores_order() -> None:
    a, b = uuid4(), uuid4()
    assert excluded_digest([a, b]) == excluded_digest([b, a]) != excluded_digest([a])


def _update(version: int, ids: tuple[UUID, ...]) -> Model.UpdateApplied:
    return Model.UpdateApplied(  # type: ignore[call-arg]
        originator_id=uuid4(),
        originator_version=version,
        timestamp=WHEN,
        prediction_ids=ids,
        step=version,
        loss_before=0.5,
        loss_after=0.4,
        digest="d",
        actor="learner",
    )


def _rollback(version: int, to: int) -> Model.RolledBack:
    return Model.RolledBack(  # type: ignore[call-arg]
        originator_id=uuid4(),
        originator_version=version,
        timestamp=WHEN,
        to_version=to,
        reason="r",
        digest="d",
        actor="op",
    )


def _pause(version: int) -> Model.Paused:
    return Model.Paused(originator_id=uuid4(), originator_version=version, timestamp=WHEN, reason="r", actor="op")  # type: ignore[call-arg]


def test_taint_follows_the_state_through_rollbacks() -> None:
    clean, bad = uuid4(), uuid4()
    registered = _pause(1)  # any event that changes nothing stands in for registration here
    events = [
        registered,
        _update(2, (clean,)),
        _update(3, (clean, bad)),  # first tainted
        _pause(4),
        _update(5, (clean,)),
        _rollback(6, 2),  # back to before the taint: clean
        _update(7, (clean,)),
        _rollback(8, 5),  # back to a tainted version: tainted again
    ]
    taint = tainted_versions(events, frozenset({bad}))
    assert [v for v, t in taint.items() if t] == [3, 4, 5, 8]


def test_weights_are_named_by_feature_unit_and_class() -> None:
    linear = param_layout(LearnerSpec(kind="logistic", n_features=2, feature_names=("age", "income")))
    assert linear.names == ("bias", "weight age", "weight income")
    softmax = param_layout(LearnerSpec(kind="softmax", n_features=2, n_classes=3))
    assert "weight x1 → class 2" in softmax.names and "bias class 0" in softmax.names
    mlp = param_layout(LearnerSpec(kind="mlp", n_features=2, hidden=(3,), head="binary"))
    assert "layer 0 weight x0 → h1[2]" in mlp.names and "layer 1 weight h1[1] → output" in mlp.names
    assert len(mlp.names) == len(set(mlp.slots.tolist())) == 2 * 3 + 3 + 3 + 1
    assert int(mlp.is_weight.sum()) == 2 * 3 + 3
