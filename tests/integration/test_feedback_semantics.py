"""Feedback semantics on real PostgreSQL: windows, default labels, partial batches."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from domain.errors import ConcurrencyError, InvalidSpecError
from domain.ledger import LabelRequest, LabelStatus
from domain.prediction import DEFAULT_LABELED_TOPIC, Prediction
from domain.spec import LearnerSpec
from projections.learning import LabeledExample
from tests.factories import prediction_events

SPEC = LearnerSpec(kind="logistic", n_features=2, batch_size=4, feedback_window_s=60.0, default_label=0.0)


def _predict(rt, model, n: int, when: datetime) -> list[Prediction.Made]:  # type: ignore[no-untyped-def]
    events = prediction_events(model, n, when=when, features=lambda i: (float(i), 1.0 - i))
    rt.ledger.record(events)
    return events


def test_default_labels_only_after_the_window_and_only_for_unlabeled(runtime) -> None:  # type: ignore[no-untyped-def]
    model = runtime.service.register_model("clicks", SPEC, "ops")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    made = _predict(runtime, model, 3, t0)
    (real,) = runtime.ledger.prepare_labels([LabelRequest(made[0].originator_id, 1.0, "crm", t0, "u")], received_at=t0)
    runtime.ledger.record([real.event])

    early, _ = runtime.ledger.prepare_default_labels(now=t0 + timedelta(seconds=30))
    assert early == []  # the window is still open
    events, cursor = runtime.ledger.prepare_default_labels(now=t0 + timedelta(seconds=61))
    assert sorted(e.originator_id for e in events) == sorted(m.originator_id for m in made[1:])
    assert all(isinstance(e, Prediction.DefaultLabeled) and e.label == 0.0 for e in events)
    runtime.ledger.record(events)
    assert cursor >= 0
    again, _ = runtime.ledger.prepare_default_labels(now=t0 + timedelta(seconds=62))
    assert again == []  # each prediction is defaulted once
    stored = runtime.ledger.get_prediction(made[1].originator_id)
    assert stored.defaulted and stored.label == 0.0 and stored.label_source == "default"
    topics = [s.topic for s in runtime.ledger.recorder.select_events(made[1].originator_id)]
    assert topics[-1] == DEFAULT_LABELED_TOPIC  # an auditor can tell it from a real label


def test_a_real_label_after_the_default_is_kept_but_late(runtime) -> None:  # type: ignore[no-untyped-def]
    model = runtime.service.register_model("clicks", SPEC, "ops")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    (made,) = _predict(runtime, model, 1, t0)
    events, _ = runtime.ledger.prepare_default_labels(now=t0 + timedelta(minutes=5))
    runtime.ledger.record(events)
    pid = made.originator_id
    (late,) = runtime.ledger.prepare_labels(
        [LabelRequest(pid, 1.0, "crm", t0, "u")], received_at=t0 + timedelta(hours=1)
    )
    assert late.status is LabelStatus.LATE and late.event is not None and late.event.originator_version == 3
    runtime.ledger.record([late.event])
    (dup,) = runtime.ledger.prepare_labels([LabelRequest(pid, 1.0, "crm", t0, "u")], received_at=t0)
    assert dup.status is LabelStatus.DUPLICATE
    prediction = runtime.ledger.get_prediction(pid)
    assert (prediction.label, prediction.late_label, prediction.in_window) == (0.0, 1.0, True)


def test_a_real_label_racing_the_default_wins_once(runtime) -> None:  # type: ignore[no-untyped-def]
    model = runtime.service.register_model("clicks", SPEC, "ops")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    (made,) = _predict(runtime, model, 1, t0)
    defaults, _ = runtime.ledger.prepare_default_labels(now=t0 + timedelta(minutes=5))
    (real,) = runtime.ledger.prepare_labels([LabelRequest(made.originator_id, 1.0, "crm", t0, "u")], received_at=t0)
    runtime.ledger.record([real.event])
    with pytest.raises(ConcurrencyError):
        runtime.ledger.record(defaults)
    assert runtime.ledger.prepare_default_labels(now=t0 + timedelta(minutes=6))[0] == []


def test_default_labels_are_learned_and_replay_exactly(runtime) -> None:  # type: ignore[no-untyped-def]
    model = runtime.service.register_model("clicks", SPEC, "ops")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    made = _predict(runtime, model, 4, t0)
    events, _ = runtime.ledger.prepare_default_labels(now=t0 + timedelta(minutes=5))
    runtime.ledger.record(events)
    learner = runtime.service.live_learner("clicks")
    for m, e in zip(made, events, strict=True):
        learner.add(LabeledExample(m.originator_id, m.features, e.label))
    runtime.ledger.record(learner.step())
    (report,) = runtime.service.verify("clicks")
    assert report.verified and report.updates_replayed == 1


def test_partial_batches_after_max_wait_are_recorded_and_replay(runtime) -> None:  # type: ignore[no-untyped-def]
    spec = LearnerSpec(kind="logistic", n_features=2, batch_size=8, max_batch_wait_s=0.05)
    model = runtime.service.register_model("fresh", spec, "ops")
    t0 = datetime.now(UTC)
    made = _predict(runtime, model, 3, t0)
    outcomes = runtime.ledger.prepare_labels(
        [LabelRequest(m.originator_id, float(i % 2), "s", t0, "u") for i, m in enumerate(made)], received_at=t0
    )
    runtime.ledger.record([o.event for o in outcomes])
    learner = runtime.service.live_learner("fresh")
    start = time.monotonic()
    for m, o in zip(made, outcomes, strict=True):
        learner.add(LabeledExample(m.originator_id, m.features, o.event.label, received=start))
    assert not learner.ready() and not learner.ready(start + 0.01)
    assert learner.next_due() == pytest.approx(start + 0.05)
    assert learner.ready(start + 0.06)
    (event,) = learner.step(start + 0.06)
    assert len(event.prediction_ids) == 3
    runtime.ledger.record([event])
    (report,) = runtime.service.verify("fresh")
    assert report.verified


@pytest.mark.parametrize("bad", [{"default_label": 2.0}, {"default_label": float("nan")}, {"max_batch_wait_s": -1.0}])
def test_bad_feedback_policies_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(InvalidSpecError):
        LearnerSpec.from_dict({"kind": "logistic", "n_features": 2, **bad})


def test_features_learned_are_the_features_as_used(runtime) -> None:  # type: ignore[no-untyped-def]
    spec = LearnerSpec(kind="logistic", n_features=2, batch_size=2)
    model = runtime.service.register_model("asused", spec, "ops")
    t0 = datetime.now(UTC)
    made = _predict(runtime, model, 2, t0)
    outcomes = runtime.ledger.prepare_labels(
        [LabelRequest(m.originator_id, 1.0, "s", t0, "u") for m in made], received_at=t0
    )
    runtime.ledger.record([o.event for o in outcomes])
    stored = runtime.ledger.get_predictions([m.originator_id for m in made])
    x = np.asarray([stored[m.originator_id].features for m in made])
    assert np.array_equal(x, np.asarray([m.features for m in made]))
