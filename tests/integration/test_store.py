"""The ledger on real PostgreSQL (embedded and the machine's server): writes, reads, guards."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from domain.errors import ConcurrencyError, ConflictingLabelError, ModelExistsError, PredictionNotFoundError
from domain.ids import new_prediction_id
from domain.ledger import LabelRequest, LabelStatus
from domain.spec import LearnerSpec
from tests.factories import prediction_events

SPEC = LearnerSpec(kind="logistic", n_features=2)


def _predictions(rt, model, n: int):  # type: ignore[no-untyped-def]
    return prediction_events(model, n, score=0.25, decision=0.0)


def test_recorded_events_read_back_exactly_with_gap_free_ids(any_runtime) -> None:  # type: ignore[no-untyped-def]
    rt = any_runtime
    model = rt.service.register_model("m", SPEC, "alice")
    events = _predictions(rt, model, 50)
    ids = rt.ledger.record(events)
    assert ids == list(range(ids[0], ids[0] + 50))
    assert rt.ledger.recorder.max_notification_id() == ids[-1]
    back = rt.ledger.get_predictions([e.originator_id for e in events])
    assert [tuple(back[e.originator_id].features) for e in events] == [e.features for e in events]
    assert rt.ledger.get_model("m").spec == SPEC


def test_registering_a_name_twice_is_refused(any_runtime) -> None:  # type: ignore[no-untyped-def]
    any_runtime.service.register_model("m", SPEC, "alice")
    with pytest.raises(ModelExistsError):
        any_runtime.service.register_model("m", SPEC, "bob")
    assert [m.name for m in any_runtime.ledger.list_models()] == ["m"]


@pytest.mark.parametrize("statement", ["UPDATE {t} SET topic = 'x'", "DELETE FROM {t}", "TRUNCATE {t}"])
def test_event_rows_cannot_be_changed_or_deleted(any_runtime, statement: str) -> None:  # type: ignore[no-untyped-def]
    rt = any_runtime
    rt.service.register_model("m", SPEC, "alice")
    table = f"{rt.ledger.recorder.datastore.schema}.ledger_events"
    before = rt.ledger.recorder.max_notification_id()
    with pytest.raises(Exception, match="append-only"):
        rt.ledger.recorder.execute_raw(statement.format(t=table))
    assert rt.ledger.recorder.max_notification_id() == before
    assert rt.ledger.get_model("m").version == 1


def test_labels_dedup_conflict_and_unknown(runtime) -> None:  # type: ignore[no-untyped-def]
    rt = runtime
    model = rt.service.register_model("m", SPEC, "alice")
    (made,) = _predictions(rt, model, 1)
    rt.ledger.record([made])
    now = datetime.now(UTC)
    pid = made.originator_id
    (first,) = rt.ledger.prepare_labels([LabelRequest(pid, 1.0, "crm", now, "bob")], received_at=now)
    assert first.status is LabelStatus.ACCEPTED
    rt.ledger.record([first.event])
    (again,) = rt.ledger.prepare_labels([LabelRequest(pid, 1.0, "crm", now, "bob")], received_at=now)
    assert again.status is LabelStatus.DUPLICATE and again.event is None
    with pytest.raises(ConflictingLabelError):
        rt.ledger.prepare_labels([LabelRequest(pid, 0.0, "crm", now, "bob")], received_at=now)
    with pytest.raises(PredictionNotFoundError):
        rt.ledger.prepare_labels([LabelRequest(new_prediction_id(), 1.0, "crm", now, "bob")], received_at=now)
    # A racing writer that slipped a second label past validation hits the primary key.
    before = rt.ledger.recorder.max_notification_id()
    with pytest.raises(ConcurrencyError):
        rt.ledger.record([first.event])
    assert rt.ledger.recorder.max_notification_id() == before


def test_label_outside_the_feedback_window_is_stored_but_late(runtime) -> None:  # type: ignore[no-untyped-def]
    rt = runtime
    model = rt.service.register_model("m", SPEC.with_changes(feedback_window_s=60.0), "alice")
    (made,) = _predictions(rt, model, 1)
    rt.ledger.record([made])
    late_time = made.timestamp.replace(year=made.timestamp.year + 1)
    (outcome,) = rt.ledger.prepare_labels(
        [LabelRequest(made.originator_id, 1.0, "crm", late_time, "bob")], received_at=late_time
    )
    assert outcome.status is LabelStatus.LATE and outcome.event is not None and not outcome.event.in_window


def test_snapshots_are_a_cache_that_can_be_dropped(runtime) -> None:  # type: ignore[no-untyped-def]
    rt = runtime
    model = rt.service.register_model("m", SPEC, "alice")
    store = rt.service.store
    store.put_snapshot(model.id, 1, "sha256:a", b"abc")
    store.put_snapshot(model.id, 1, "sha256:a", b"abc")  # idempotent
    snap = store.get_snapshot(model.id, 5)
    assert snap is not None and (snap.version, snap.state) == (1, b"abc")
    assert store.delete_snapshots(model.id) == 1
    assert store.get_snapshot(model.id, 5) is None
