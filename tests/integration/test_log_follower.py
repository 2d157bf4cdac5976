"""The log follower, the learner election lock and the default-label sweeper, on real PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from domain.prediction import LABELED_TOPIC, MADE_TOPIC, Prediction, make_prediction_event
from domain.spec import LearnerSpec
from server.default_sweeper import DefaultSweeper
from server.election import LockSession, ModelLock, lock_key
from server.log_follower import LogFollower

SPEC = LearnerSpec(kind="logistic", n_features=2, batch_size=4, feedback_window_s=1.0, default_label=0.0)


def _made(model: Any, n: int, when: datetime | None = None) -> list[Prediction.Made]:
    now = when or datetime.now(UTC)
    return [
        make_prediction_event(
            uuid.uuid4(),
            model_id=model.id,
            model_name=model.name,
            model_version=1,
            spec=SPEC,
            features=[float(i), 1.0],
            score=0.5,
            decision=0.0,
            params_digest="-",
            routing="champion",
            actor="t",
            timestamp=now,
        )
        for i in range(n)
    ]


def test_follower_reads_in_order_by_topic_and_wakes_on_notify(runtime: Any) -> None:
    model = runtime.service.register_model("f", SPEC, "t")
    ledger = runtime.ledger
    follower = LogFollower(ledger, [MADE_TOPIC], page_size=500, poll_interval_s=5.0)
    try:
        first = _made(model, 1200)
        ledger.record(first)
        got = follower.read()
        assert [e.originator_id for _, e in got] == [e.originator_id for e in first]  # three pages, in order
        assert follower.read() == []

        # A commit from another thread wakes the wait long before the 5 s poll interval.
        threading.Timer(0.2, lambda: ledger.record(_made(model, 3))).start()
        started = time.monotonic()
        assert follower.wait(5.0)
        assert time.monotonic() - started < 2.0
        assert len(follower.read()) == 3

        follower.seek(got[-1][0])  # seeking back re-reads
        assert len(follower.read()) == 3
    finally:
        follower.close()


def test_follower_polls_without_listen(runtime: Any) -> None:
    model = runtime.service.register_model("p", SPEC, "t")
    follower = LogFollower(runtime.ledger, [LABELED_TOPIC, MADE_TOPIC], listen=False, poll_interval_s=0.05)
    runtime.ledger.record(_made(model, 2))
    assert not follower.wait(1.0)  # capped at the poll interval
    assert len(follower.read_page()) == 2


def test_one_lock_holder_per_model_and_takeover(runtime: Any) -> None:
    model = runtime.service.register_model("l", SPEC, "t")
    first, second = ModelLock(runtime.ledger, model.id), ModelLock(runtime.ledger, model.id)
    try:
        assert first.try_acquire()
        assert first.try_acquire()  # re-entrant for its holder
        assert not second.try_acquire()
        first.release()  # as when the holder's session dies
        assert second.try_acquire()
        assert not first.try_acquire()
    finally:
        first.release()
        second.release()
    assert lock_key("a", model.id) != lock_key("b", model.id)  # schemas never contend


def test_one_session_holds_many_locks_and_frees_them_all_when_it_dies(runtime: Any) -> None:
    models = [runtime.service.register_model(f"s{i}", SPEC, "t").id for i in range(30)]
    first, second = LockSession(runtime.ledger), LockSession(runtime.ledger)
    try:
        assert first.try_acquire(models[:20]) == frozenset(models[:20])  # one round trip
        assert first.try_acquire(models[:20]) == frozenset()  # held already: not taken twice
        assert second.try_acquire(models) == frozenset(models[20:])  # only the free ones
        first.release(models[0])
        assert second.try_acquire(models) == frozenset({models[0]})
        assert first.alive() and models[0] not in first.held

        # The session dies (as when its process is killed): every lock is free at once,
        # and the holder learns it from ``alive``.
        with psycopg.connect(runtime.database.url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (_backend_pid(first),))
        assert not first.alive() and first.held == frozenset()
        # No new session until the holder has stopped learning what it lost.
        assert first.lost and first.try_acquire(models) == frozenset()
        first.acknowledge()
        assert second.try_acquire(models) == frozenset(models[1:20])
    finally:
        first.close()
        second.close()
    third = LockSession(runtime.ledger)
    try:
        assert third.try_acquire(models) == frozenset(models)  # close() released them all
    finally:
        third.close()


def _backend_pid(session: LockSession) -> int:
    conn: Any = session._conn
    return int(conn.info.backend_pid)


def test_sweeper_records_default_labels_only_for_led_models(runtime: Any) -> None:
    led = runtime.service.register_model("d1", SPEC, "t")
    other = runtime.service.register_model("d2", SPEC, "t")
    old = datetime.now(UTC) - timedelta(seconds=5)
    mine, theirs = _made(led, 3, old), _made(other, 2, old)
    runtime.ledger.record([*mine, *theirs])
    sweeper = DefaultSweeper(runtime.ledger, lambda: frozenset({led.id}))
    assert sweeper.sweep() == 3
    assert sweeper.sweep() == 0
    found = runtime.ledger.get_predictions([e.originator_id for e in mine + theirs])
    assert all(found[e.originator_id].defaulted for e in mine)
    assert not any(found[e.originator_id].defaulted for e in theirs)
