"""Kill -9 ``learnledger learn`` at random points during a stream: every label learned once.

Several learn processes run at a time (a leader and standbys that take over via the
advisory lock); the leader is SIGKILLed 20 times and a fresh standby started each
time. A test hook sleeps between computing a step and committing it, so kills land in
that window as well as while reading, stepping and sweeping.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domain.spec import LearnerSpec
from tests.conftest import make_runtime
from tests.processes import (
    LearnProcess,
    Stream,
    default_labeled,
    learned_batches,
    run_audit,
    wait_for_leader,
    wait_for_standby,
)

KILLS = 20
# A leader and standbys: a process start (imports, XLA compile) costs seconds, so the
# standbys start while earlier leaders are being killed.
PROCESSES = 4
SPEC = LearnerSpec(
    kind="logistic",
    n_features=4,
    batch_size=8,
    learning_rate=0.05,
    max_batch_wait_s=0.2,
    feedback_window_s=2.0,
    default_label=0.0,
)


@pytest.fixture
def learn_env(cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI environment with small snapshots and the commit-delay test hook."""
    return dict(
        cli_env, LEARNLEDGER_SNAPSHOT_INTERVAL="10", PYTHONUNBUFFERED="1", LEARNLEDGER_TEST_COMMIT_DELAY_S="0.05"
    )


@pytest.fixture
def rt(database_url: str, schema: str) -> Iterator[Any]:
    """A runtime on the learners' schema, for writing the stream and checking the log."""
    runtime = make_runtime(database_url, schema, snapshot_interval=10)
    yield runtime
    runtime.close()


LEARN_ARGS = ("--sweep-interval", "0.5", "--poll-interval", "0.2")


@pytest.mark.slow
def test_kill_9_learner_learns_every_label_exactly_once(learn_env: dict[str, str], rt: Any, tmp_path: Path) -> None:
    model = rt.service.register_model("crash", SPEC, "test")
    log_path = tmp_path / "learn.log"
    rng = random.Random(7)
    stream = Stream(rt.ledger, model, interval_s=0.1)
    writer = threading.Thread(target=stream.run, daemon=True)
    procs = [LearnProcess(learn_env, log_path, *LEARN_ARGS) for _ in range(PROCESSES)]
    try:
        leader = wait_for_leader(procs)
        writer.start()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.1, 1.2))
            # A compiled standby takes over within a poll of the lock: the kills then
            # cost seconds of test time, not a process start each.
            wait_for_standby(procs)
            leader.kill()
            procs = [p for p in procs if p is not leader] + [LearnProcess(learn_env, log_path, *LEARN_ARGS)]
            leader = wait_for_leader(procs, timeout=60)
        stream.stop.set()
        writer.join(30)

        # Everything in the window (and every default label) is eventually learned.
        expected_late = {pid for pid, in_window in stream.labeled.items() if not in_window}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            defaults = default_labeled(rt.ledger, stream.silent_ids)
            expected = {pid for pid, w in stream.labeled.items() if w} | defaults
            learned = [pid for batch in learned_batches(rt.ledger, model.id) for pid in batch]
            if len(defaults) == len(stream.silent_ids) and set(learned) >= expected:
                break
            time.sleep(0.5)
        for p in procs:  # all at once: a standby stopping must not take over first
            p.proc.terminate()
        # A process still importing has no handler yet (-SIGTERM); every other stops cleanly.
        codes = [(p.terminate(), p.standby or p.led_at is not None) for p in procs]
        assert all(code == 0 for code, started in codes if started), codes
    finally:
        stream.stop.set()
        for p in procs:
            p.kill()

    duplicates = [pid for pid, n in Counter(learned).items() if n > 1]
    assert not duplicates, f"{len(duplicates)} labels learned more than once"
    assert set(learned) == expected, (len(set(learned)), len(expected))
    assert not set(learned) & expected_late
    assert len(stream.labeled) > 1000, "the stream was too short to mean anything"
    head = rt.ledger.get_model("crash")
    assert head.updates_applied >= len(expected) // SPEC.batch_size
    payload = run_audit(learn_env)
    assert payload["verified"], payload
    assert payload["updates_replayed"] == head.updates_applied


@pytest.mark.slow
def test_second_learner_waits_and_takes_over(learn_env: dict[str, str], rt: Any, tmp_path: Path) -> None:
    model = rt.service.register_model("solo", SPEC, "test")
    log_path = tmp_path / "learn.log"
    first = LearnProcess(learn_env, log_path, *LEARN_ARGS)
    second: LearnProcess | None = None
    stream = Stream(rt.ledger, model, late=0, silent=0)
    try:
        assert wait_for_leader([first]) is first
        second = LearnProcess(learn_env, log_path, *LEARN_ARGS)
        stream.run(rounds=20)
        time.sleep(3.0)  # long enough for the second one to have started and tried the lock
        assert second.proc.poll() is None and second.led_at is None, "two learners lead one model"
        versions_before = rt.ledger.get_model("solo").version
        assert versions_before > 1
        killed_at = time.monotonic()
        first.kill()
        assert wait_for_leader([second], timeout=30) is second
        assert second.led_at is not None and second.led_at > killed_at
        stream.run(rounds=20)
        expected = set(stream.labeled)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            learned = [pid for batch in learned_batches(rt.ledger, model.id) for pid in batch]
            if set(learned) >= expected:
                break
            time.sleep(0.2)
        assert second.terminate() == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert sorted(Counter(learned).values()) == [1] * len(expected)
    assert set(learned) == expected
    assert run_audit(learn_env)["verified"]
