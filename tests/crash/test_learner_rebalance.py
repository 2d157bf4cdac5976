"""Running ``learnledger learn`` processes rebalance: a later one gets its fair share.

A first process leads every model; a second one started later is handed about half of
them (each after its current turn committed), learns them, and when it is SIGKILLed the
first takes them all back; a third one is handed half again and stopped with SIGTERM,
and the first takes its models back too. Throughout, every in-window label is learned
exactly once, the versions of each model are one unbroken sequence, and ``audit verify``
replays every digest. The balancing policy itself is checked on hand-made censuses first.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domain.spec import LearnerSpec
from server.balancer import Balancer, Census, fair_share
from tests.conftest import make_runtime
from tests.processes import LearnProcess, Traffic, consumed, events_of, led_by, run_audit, wait_until

N_MODELS = 16
SPEC = LearnerSpec(kind="logistic", n_features=4, batch_size=4, learning_rate=0.1, max_batch_wait_s=0.2)
LEARN_ARGS = ("--poll-interval", "0.2", "--sweep-interval", "0", "--seal-interval", "0", "--workers", "2")


# --- the policy, on hand-made censuses ------------------------------------------------


def _balancer() -> Balancer:
    return Balancer(acquire_per_tick=16, shed_per_tick=4, orphan_grace_s=1.0, cooldown_s=5.0, rng=random.Random(0))


def _ids(n: int) -> list[uuid.UUID]:
    return sorted(uuid.uuid4() for _ in range(n))


def test_fair_share_rounds_up() -> None:
    assert [fair_share(16, m) for m in (1, 2, 3, 5, 16, 17)] == [16, 8, 6, 4, 1, 1]
    assert fair_share(0, 3) == 0 and fair_share(5, 0) == 5


def test_a_process_above_its_share_hands_over_its_newest_models_into_the_room_there_is() -> None:
    models = _ids(16)
    b = _balancer()
    b.observe(Census(me=1, members=frozenset({1, 2}), holders=dict.fromkeys(models, 1)), models, now=0.0)
    assert b.share == 8
    assert b.to_hand_over(models) == models[-4:]  # a small batch, the newest acquired
    # The peer took one of them, three are still free: they fill its room first.
    held = {**dict.fromkeys(models[:10], 1), models[10]: 2}
    b.observe(Census(1, frozenset({1, 2}), held), models, now=0.2)
    assert b.to_hand_over(models[:10]) == models[8:10]  # 8 - 1 led - 3 free = room for 2
    # At the share: nothing (hysteresis); no peer below its share: nothing either.
    b.observe(Census(1, frozenset({1, 2}), {m: 1 if i < 8 else 2 for i, m in enumerate(models)}), models, now=0.6)
    assert b.to_hand_over(models[:8]) == []
    b.observe(Census(1, frozenset({1}), {m: 1 if i < 12 else 3 for i, m in enumerate(models)}), models, now=0.8)
    assert b.to_hand_over(models[:12]) == []  # 3 leads some but is no member (another group)


def test_a_process_at_its_share_leaves_free_models_to_peers_until_they_are_orphaned() -> None:
    models = _ids(8)
    held = {m: 1 if i < 4 else 2 for i, m in enumerate(models[:7])}  # the last one is free
    b = _balancer()
    b.observe(Census(1, frozenset({1, 2}), held), models, now=0.0)
    assert b.share == 4 and b.to_try(models[4:], leading=4, now=0.0) == set()
    b.observe(Census(1, frozenset({1, 2}), held), models, now=1.5)
    assert b.to_try(models[4:], leading=4, now=1.5) == {models[7]}  # nobody took it for 1.5 s
    # Below the share it takes at most what it is short of (and tries held ones, to stand by).
    b.observe(Census(1, frozenset({1, 2, 3}), {models[0]: 2}), models, now=2.0)
    assert b.share == 3
    tried = b.to_try(models, leading=1, now=2.0)
    assert models[0] in tried and len(tried - {models[0]}) == 2


def test_handed_over_models_cool_down_unless_a_peer_leaves() -> None:
    models = _ids(4)
    b = _balancer()
    b.observe(Census(1, frozenset({1, 2}), {models[0]: 1}), models, now=0.0)
    b.handed_over(models[1], now=0.0)
    assert models[1] not in b.to_try(models[1:], leading=1, now=0.0)
    b.observe(Census(1, frozenset({1, 2}), {models[0]: 1}), models, now=3.0)
    assert models[1] not in b.to_try(models[1:], leading=1, now=3.0)
    b.observe(Census(1, frozenset({1}), {models[0]: 1}), models, now=3.2)  # the peer died
    assert b.to_try(models[1:], leading=1, now=3.2) == set(models[1:])


def test_without_a_census_or_membership_every_model_is_competed_for() -> None:
    models = _ids(20)
    b = _balancer()
    b.observe(None, models, now=0.0)
    assert b.share is None and len(b.to_try(models, leading=0, now=0.0)) == 16
    b.observe(Census(1, frozenset({2}), {}), models, now=0.1)  # not joined yet
    assert b.share is None and b.to_hand_over(models) == []


# --- real processes --------------------------------------------------------------------


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI environment with small snapshots."""
    return dict(cli_env, LEARNLEDGER_SNAPSHOT_INTERVAL="10", PYTHONUNBUFFERED="1")


@pytest.fixture
def rt(database_url: str, schema: str) -> Iterator[Any]:
    """A runtime on the learners' schema, for writing labels and checking the log."""
    runtime = make_runtime(database_url, schema, snapshot_interval=10)
    yield runtime
    runtime.close()


def named(proc: LearnProcess, event: str) -> list[str]:
    """The model ids of every ``event`` a process printed."""
    return [e["model_id"] for e in events_of(proc) if e.get("event") == event]


def balanced(every: set[str], p: LearnProcess, q: LearnProcess) -> bool:
    """Whether the two processes together lead every model, none twice, each 40–60 % of them."""
    mine, theirs = led_by(p), led_by(q)
    low, high = 0.4 * len(every), 0.6 * len(every)
    return mine | theirs == every and not mine & theirs and all(low <= len(s) <= high for s in (mine, theirs))


@pytest.mark.slow
def test_a_later_learner_gets_its_share_and_gives_it_back_when_killed(
    env: dict[str, str], rt: Any, tmp_path: Path
) -> None:
    models = [rt.service.register_model(f"r-{i:02d}", SPEC, "test") for i in range(N_MODELS)]
    every = {str(m.id) for m in models}
    labels = Traffic(rt, models, window_s=SPEC.feedback_window_s)
    log_path = tmp_path / "learn.log"
    a = LearnProcess(env, log_path, *LEARN_ARGS)
    b: LearnProcess | None = None
    c: LearnProcess | None = None
    try:
        wait_until(lambda: led_by(a) == every, 120, "the first learner to lead every model")
        labels.round(per_model=5)
        wait_until(labels.learned, 60, "the first round to be learned")

        # A second learner joins: about half the models are handed over to it.
        b = LearnProcess(env, log_path, *LEARN_ARGS)
        second = b
        balanced_s = wait_until(lambda: balanced(every, a, second), 120, "the models to be split about evenly")
        moved = led_by(b)
        assert moved <= set(named(a, "handed_over")), "a model was taken without being handed over"
        assert not named(a, "lost") and not named(b, "lost")
        before = {m.id: rt.ledger.get_model_by_id(m.id).version for m in models if str(m.id) in moved}

        # The moved models learn under their new leader.
        for _ in range(3):
            labels.round(per_model=5)
            time.sleep(0.3)
        wait_until(labels.learned, 60, "every model to learn under the new split")
        assert all(rt.ledger.get_model_by_id(mid).version > v for mid, v in before.items())
        # No back and forth: each model handed over at most once, and never back.
        assert max(Counter(named(a, "handed_over")).values()) == 1 and not named(b, "handed_over")

        # The second learner dies: the first takes every model back, and learning goes on.
        b.kill()
        takeover_s = wait_until(lambda: led_by(a) == every, 30, "the first learner to take every model back")
        labels.round(per_model=5)
        wait_until(labels.learned, 60, "every model to learn after the takeover")

        # A third joins, then is stopped gracefully (SIGTERM): its last commits finish, its
        # locks and its place in the group go, and the first takes its models back.
        c = LearnProcess(env, log_path, *LEARN_ARGS)
        third = c
        wait_until(lambda: balanced(every, a, third), 120, "the models to be split with the third learner")
        labels.round(per_model=5)
        assert c.terminate() == 0
        wait_until(lambda: led_by(a) == every, 30, "the first learner to take every model back from the third")
        wait_until(labels.learned, 60, "every model to learn after the third stopped")
        stopped = a.terminate()
    finally:
        a.kill()
        for other in (b, c):
            if other is not None:
                other.kill()
    assert stopped == 0

    for m in models:
        taken = consumed(rt, m.id)
        duplicates = [pid for pid, n in Counter(taken).items() if n > 1]
        assert not duplicates, f"{m.name}: {len(duplicates)} labels learned more than once"
        assert set(taken) == labels.in_window[m.id], m.name
        versions = [e.originator_version for e in rt.ledger.get_model_events(m.id)]
        assert versions == list(range(1, len(versions) + 1)), f"{m.name}: versions {versions}"
    payload = run_audit(env)
    assert payload["verified"], payload
    assert payload["updates_replayed"] == sum(rt.ledger.get_model_by_id(m.id).updates_applied for m in models)
    print(f"\nrebalance: split {len(moved)}/{N_MODELS} after {balanced_s:.1f}s, taken back in {takeover_s:.1f}s")
