"""Every event survives the orjson round trip exactly (UUIDs, aware datetimes, tuples)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import NonFiniteValueError
from domain.mapping import OrjsonTranscoder, TypedMapper
from domain.model import Model
from domain.prediction import Prediction, make_label_event, make_prediction_event
from domain.spec import LearnerSpec

MAPPER = TypedMapper(OrjsonTranscoder())
SPEC = LearnerSpec(kind="logistic", n_features=3)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
aware = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
)


def round_trip(event: object) -> object:
    return MAPPER.to_domain_event(MAPPER.to_stored_event(event))  # type: ignore[arg-type]


@given(
    pid=st.uuids(),
    mid=st.uuids(),
    features=st.tuples(finite, finite, finite),
    score=finite,
    when=aware,
    version=st.integers(1, 2**40),
)
def test_prediction_made_round_trips_exactly(
    pid: UUID, mid: UUID, features: tuple[float, ...], score: float, when: datetime, version: int
) -> None:
    event = make_prediction_event(
        pid,
        model_id=mid,
        model_name="m",
        model_version=version,
        spec=SPEC,
        features=features,
        score=score,
        decision=1.0,
        params_digest="sha256:x",
        routing="champion",
        actor="a",
        timestamp=when,
    )
    back = round_trip(event)
    assert back == event
    assert (
        type(back.features) is tuple and type(back.model_id) is UUID and back.timestamp.utcoffset() == when.utcoffset()
    )


@given(pid=st.uuids(), label=st.sampled_from([0.0, 1.0]), when=aware, event_time=aware, source=st.text(max_size=30))
def test_label_round_trips_exactly(pid: UUID, label: float, when: datetime, event_time: datetime, source: str) -> None:
    event = make_label_event(
        pid, model_id=pid, label=label, source=source, event_time=event_time, in_window=True, actor="a", timestamp=when
    )
    assert round_trip(event) == event


@given(ids=st.lists(st.uuids(), min_size=1, max_size=20, unique=True), loss=finite)
def test_model_events_round_trip_exactly(ids: list[UUID], loss: float) -> None:
    model = Model(
        name="m", spec=SPEC, platform=(("jax", "0.10"), ("backend", "cpu")), initial_digest="sha256:i", actor="a"
    )
    model.apply_update(tuple(ids), 1, loss, loss, "sha256:u", "learner")
    for event in model.collect_events():
        back = round_trip(event)
        assert back == event
    registered = round_trip(Model(name="n", spec=SPEC, platform=(), initial_digest="d", actor="a").collect_events()[0])
    assert isinstance(registered, Model.Registered)
    assert registered.spec == SPEC and isinstance(registered.spec, LearnerSpec)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_never_become_events(bad: float) -> None:
    with pytest.raises(NonFiniteValueError, match="feature 1"):
        make_prediction_event(
            UUID(int=1),
            model_id=UUID(int=2),
            model_name="m",
            model_version=1,
            spec=SPEC,
            features=(0.0, bad, 0.0),
            score=0.5,
            decision=1.0,
            params_digest="d",
            routing="champion",
            actor="a",
            timestamp=datetime.now(UTC),
        )


def test_transcoder_refuses_non_finite_state_even_if_an_event_slipped_through() -> None:
    with pytest.raises(NonFiniteValueError):
        OrjsonTranscoder().encode({"score": float("nan")})


def test_replaying_an_aggregate_from_round_tripped_events_gives_the_same_state() -> None:
    model = Model(name="m", spec=SPEC, platform=(), initial_digest="d0", actor="a")
    model.apply_update((UUID(int=5),), 1, 0.5, 0.4, "d1", "l")
    model.pause("x", "op")
    events = [round_trip(e) for e in model.collect_events()]
    rebuilt = None
    for event in events:
        rebuilt = event.mutate(rebuilt)  # type: ignore[attr-defined]
    assert isinstance(rebuilt, Model)
    assert (rebuilt.version, rebuilt.digest, rebuilt.paused, rebuilt.spec) == (3, "d1", True, SPEC)
    assert isinstance(Prediction.Made, type)


def test_fast_built_events_equal_the_aggregate_built_ones() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    pid, mid = UUID(int=7), UUID(int=8)
    fast = make_prediction_event(
        pid,
        model_id=mid,
        model_name="m",
        model_version=3,
        spec=SPEC,
        features=[1, 2.5, -3],
        score=0.25,
        decision=0.0,
        params_digest="d",
        routing="champion",
        actor="a",
        timestamp=when,
    )
    slow = Prediction.Made(  # type: ignore[call-arg]
        originator_id=pid,
        originator_version=1,
        timestamp=when,
        originator_topic=fast.originator_topic,
        model_id=mid,
        model_version=3,
        features=(1.0, 2.5, -3.0),
        score=0.25,
        decision=0.0,
        params_digest="d",
        routing="champion",
        actor="a",
    )
    assert fast == slow and vars(fast) == vars(slow)
    fast_label = make_label_event(
        pid, model_id=mid, label=1.0, source="s", event_time=when, in_window=True, actor="a", timestamp=when
    )
    slow_label = Prediction.Labeled(  # type: ignore[call-arg]
        originator_id=pid,
        originator_version=2,
        timestamp=when,
        model_id=mid,
        label=1.0,
        source="s",
        event_time=when,
        in_window=True,
        actor="a",
    )
    assert fast_label == slow_label and vars(fast_label) == vars(slow_label)
    assert MAPPER.to_row(fast) == tuple(vars(MAPPER.to_stored_event(fast)).values())
