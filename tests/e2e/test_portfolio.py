"""A portfolio of 100 models learned by two ``learnledger learn`` processes with shared workers.

Different specs (every learner kind, optimizer and several batch sizes), predictions and
labels spread over all of them, two learn processes of two workers each splitting the
models by advisory lock (and rebalancing until each leads about half); one is
SIGKILLed mid-stream and the other takes its models over. One model's learner fails on
every step (the ``LEARNLEDGER_FAULT_MODEL`` hook): it is retried with backoff and never
learns, and every other model learns every in-window label exactly once. Connections
per process stay bounded (counted in ``pg_stat_activity`` by application name). Then
``stage --fraction 0.25`` leaves exactly 25 models learning, on the record, and
``audit verify`` passes for all of them.

In-process, with the reader's counters in view: a failing model's retries replay its
slot's journal instead of making the shared log reader rewind, and once the fault is
cleared it catches up with exactly the digests a replay computes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from domain.model import Model
from domain.spec import LearnerSpec
from server import model_worker
from server.journal import Journal
from server.model_worker import FAULT_MODELS_VAR, ModelRunner
from server.portfolio import stage_key
from server.worker_pool import LogDispatcher, WorkerPool
from tests.conftest import make_runtime
from tests.processes import LearnProcess, Traffic, consumed, events_of, led_by, run_audit, wait_until

N_MODELS = 100
FEATURES = 4
WINDOW_S = 600.0
# Few distinct specs: each one is compiled once per process (``make_learner`` caches by
# spec), and compiling is most of a learn process's start-up.
COMMON: dict[str, Any] = {"n_features": FEATURES, "feedback_window_s": WINDOW_S, "max_batch_wait_s": 0.3}
SPECS = [
    LearnerSpec(kind="logistic", optimizer="sgd", learning_rate=0.1, batch_size=8, **COMMON),
    LearnerSpec(kind="logistic", optimizer="adam", batch_size=16, **COMMON),
    LearnerSpec(kind="softmax", n_classes=3, optimizer="adagrad", batch_size=8, **COMMON),
    LearnerSpec(kind="linear", optimizer="sgd", learning_rate=0.05, batch_size=4, **COMMON),
    LearnerSpec(kind="mlp", hidden=(8,), optimizer="adam", batch_size=8, **COMMON),
    LearnerSpec(kind="mlp", hidden=(4,), head="regression", optimizer="sgd", batch_size=16, **COMMON),
]
FAULTY = "m-007"
WORKERS = ("--workers", "2")
LEARN_ARGS = ("--poll-interval", "0.2", "--sweep-interval", "0", "--seal-interval", "0", *WORKERS)
# Pool (4 + 8 overflow), the LISTEN connection and the lock session: whatever the portfolio.
MAX_CONNECTIONS = 14


@pytest.fixture
def rt(database_url: str, schema: str) -> Iterator[Any]:
    """A runtime on the learners' schema, for writing traffic and checking the log."""
    runtime = make_runtime(database_url, schema)
    yield runtime
    runtime.close()


class ConnectionSampler:
    """Samples how many connections each learn process holds (by application name)."""

    def __init__(self, url: str, names: list[str]):
        self.url = url
        self.names = names
        self.peak: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                rows = conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity "
                    "WHERE application_name = ANY(%s) GROUP BY application_name",
                    (self.names,),
                ).fetchall()
                for name, count in rows:
                    self.peak[name] = max(self.peak[name], count)
                self.stop.wait(0.1)


@pytest.mark.slow
def test_portfolio_of_100_models_with_shared_workers(
    cli_env: dict[str, str], database_url: str, rt: Any, tmp_path: Path
) -> None:
    started = time.monotonic()
    models = [rt.service.register_model(f"m-{i:03d}", SPECS[i % len(SPECS)], "test") for i in range(N_MODELS)]
    faulty = next(m for m in models if m.name == FAULTY)
    healthy = [m for m in models if m is not faulty]
    traffic = Traffic(rt, models, window_s=WINDOW_S)
    traffic.round()  # a backlog before any learner runs

    apps = [f"ll-learn-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    env = dict(cli_env, PYTHONUNBUFFERED="1", **{FAULT_MODELS_VAR: FAULTY})
    log_path = tmp_path / "learn.log"
    a = LearnProcess(dict(env, PGAPPNAME=apps[0]), log_path, *LEARN_ARGS)
    b = LearnProcess(dict(env, PGAPPNAME=apps[1]), log_path, *LEARN_ARGS)
    sampler = ConnectionSampler(database_url, apps)
    sampler.thread.start()
    try:
        # Both processes lead a share, together all of them, and rebalance to about half each.
        # (Two stdout streams read apart can show a model handed over in one and already
        # led in the other: the split is checked once it is at rest.)
        def split_evenly() -> bool:
            mine, theirs = led_by(a), led_by(b)
            return len(mine | theirs) == N_MODELS and not mine & theirs and 40 <= len(mine) <= 60

        wait_until(lambda: len(led_by(a) | led_by(b)) == N_MODELS, 120, "every model to be led")
        wait_until(split_evenly, 60, "the models to be split about evenly")
        split = (len(led_by(a)), len(led_by(b)))
        for _ in range(3):
            traffic.round()
            time.sleep(0.3)

        # The leader of most models dies; the other takes them over, and learning goes on.
        victim, survivor = (a, b) if split[0] >= split[1] else (b, a)
        victim.kill()
        wait_until(lambda: len(led_by(survivor)) == N_MODELS, 60, "the survivor to take every model over")
        for _ in range(3):
            traffic.round()
            time.sleep(0.3)

        def all_learned() -> bool:
            return all(set(consumed(rt, m.id)) >= traffic.in_window[m.id] for m in healthy)

        wait_until(all_learned, 90, "every healthy model to learn its labels")
        learned_at = time.monotonic() - started
        failures = [e for e in events_of(survivor) if e.get("event") == "failed"]

        # Staged enablement: exactly the first 25 by sha256 of the name learn.
        stage = _cli(env, "stage", "--fraction", "0.25", "--reason", "portfolio test", "--json")
        again = _cli(env, "stage", "--fraction", "0.25", "--json")
        before = {m.id: rt.ledger.get_model_by_id(m.id).version for m in models}
        traffic.round(per_model=16, late=0)
        staged_at = time.monotonic()
        learning = set(stage["learning"])
        wait_until(
            lambda: all(set(consumed(rt, m.id)) >= traffic.in_window[m.id] for m in healthy if m.name in learning),
            60,
            "the staged models to learn",
        )
        staged_s = time.monotonic() - staged_at
        time.sleep(1.0)  # paused models would have stepped by now if they were going to
        assert survivor.terminate() == 0
    finally:
        sampler.stop.set()
        a.kill()
        b.kill()
    heads = {m.id: rt.ledger.get_model_by_id(m.id) for m in models}

    # Exactly once, nothing late, for every healthy model (the last round only for the staged).
    for m in healthy:
        taken = consumed(rt, m.id)
        assert len(taken) == len(set(taken)), f"{m.name} learned a label twice"
        assert not set(taken) & traffic.late, f"{m.name} learned a late label"
        if m.name in learning:
            assert set(taken) == traffic.in_window[m.id], m.name
        else:
            assert heads[m.id].version == before[m.id] + 0, f"paused {m.name} kept learning"
    # The failing model: retried with growing backoff, never learned; the others unharmed.
    assert heads[faulty.id].updates_applied == 0
    mine = [f for f in failures if f["model_id"] == str(faulty.id)]
    assert len(mine) >= 2 and all(f["model_id"] == str(faulty.id) for f in failures), failures
    assert mine[-1]["retry_s"] > mine[0]["retry_s"]
    assert len(mine) <= 12, f"{len(mine)} retries: the backoff did not hold"  # 0.5 s doubling to 30 s

    # Connections: bounded by the pool, not by the 100 models.
    assert all(0 < sampler.peak[app] <= MAX_CONNECTIONS for app in apps), sampler.peak

    # Staging: recorded, ordered by sha256 of the name, idempotent.
    order = sorted((m.name for m in models), key=stage_key)
    assert stage["learning"] == order[:25] and len(stage["paused"]) == 75 and stage["resumed"] == []
    assert again["paused"] == [] and again["resumed"] == [] and again["unchanged"] == N_MODELS
    assert sum(not h.paused for h in heads.values()) == 25
    for m in models:
        if m.name not in learning:
            last = [e for e in rt.ledger.get_model_events(m.id) if isinstance(e, Model.Paused)][-1]
            assert last.reason.startswith("stage 1/4") and "portfolio test" in last.reason, last.reason

    payload = run_audit(cli_env)
    assert payload["verified"], payload
    print(
        f"\nportfolio: split {split}, all learned after {learned_at:.1f}s, staged round learned in "
        f"{staged_s:.1f}s, peak connections {dict(sampler.peak)}, "
        f"{len(mine)} failures of {FAULTY}, total {time.monotonic() - started:.1f}s"
    )


def _cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    payload: dict[str, Any] = json.loads(done.stdout)
    return payload


def test_a_journal_replays_from_any_position_it_covers_and_only_those() -> None:
    def label(position: int, prediction: uuid.UUID) -> tuple[int, Any]:
        return position, SimpleNamespace(originator_id=prediction, originator_version=2)

    ids = [uuid.uuid4() for _ in range(6)]
    journal = Journal(limit=4)
    assert journal.resume_from(0) is None  # never loaded: the reader must rewind
    journal.reset(10)
    journal.extend([label(11 + i, p) for i, p in enumerate(ids[:3])])
    assert [p for p, _ in journal.resume_from(10) or []] == [11, 12, 13]
    journal.trim_through(ids[1])  # a batch through the label at 12 committed
    assert journal.base == 12 and journal.resume_from(11) is None  # only a rollback resumes there
    journal.extend([label(14 + i, p) for i, p in enumerate(ids[3:])])
    assert [p for p, _ in journal.resume_from(12) or []] == [13, 14, 15, 16]
    journal.extend([label(17, uuid.uuid4())])  # past the limit: the oldest goes
    assert journal.base == 13 and journal.resume_from(12) is None
    assert [p for p, _ in journal.resume_from(15) or []] == [16, 17] and len(journal) == 2


def test_failing_model_retries_without_rewinding_the_shared_reader(rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_worker, "BACKOFF_S", 0.2)  # several retries within seconds
    models = [rt.service.register_model(f"j-{i}", SPECS[0], "test") for i in range(4)]
    faulty, healthy = models[0], models[1:]
    traffic = Traffic(rt, models, window_s=WINDOW_S)
    reports: list[dict[str, Any]] = []
    stop, kick = threading.Event(), threading.Event()
    runner = ModelRunner(rt.service, report=reports.append, rewound=kick.set, fault_models=frozenset({faulty.name}))
    pool = WorkerPool(runner, 2, stop, reader_kick=kick)
    reader = LogDispatcher(rt.ledger, pool, stop, poll_interval_s=0.2)
    reader_thread = threading.Thread(target=reader.run, daemon=True)

    def learned(some: list[Model]) -> bool:
        return all(set(consumed(rt, m.id)) >= traffic.in_window[m.id] for m in some)

    def failures() -> int:
        return sum(r["event"] == "failed" and r["model_id"] == str(faulty.id) for r in reports)

    pool.start()
    reader_thread.start()
    try:
        for m in models:
            pool.add(m.id)
        traffic.round()
        # Each model's first load rewinds the reader to where it resumes: that is due.
        wait_until(lambda: learned(healthy) and failures() >= 1, 60, "the healthy models to learn")
        rewinds, reread, pages = reader.rewinds, reader.reread, reader.pages

        # The faulty model fails and is retried (reloaded) again and again, while labels
        # keep arriving: the others learn them, and the reader never goes back.
        for _ in range(3):
            traffic.round()
            time.sleep(0.3)
        wait_until(lambda: learned(healthy) and failures() >= 5, 60, "retries of the faulty model")
        assert (reader.rewinds, reader.reread) == (rewinds, reread), "a retry rewound the shared reader"
        assert reader.pages > pages
        assert rt.ledger.get_model_by_id(faulty.id).updates_applied == 0

        # Fault cleared: the next retry learns everything from its journal, still without a rewind.
        runner.fault_models = frozenset()
        wait_until(lambda: learned(models), 60, "the faulty model to catch up")
        # An operator's pause and resume reload the model too: the labels that came in
        # meanwhile are learned after the resume, from the journal as well.
        paused = healthy[0]
        rt.service.pause(paused.name, "test", "operator")
        traffic.round()
        wait_until(lambda: learned([m for m in models if m is not paused]), 60, "a round while one is paused")
        assert not learned([paused])
        rt.service.resume(paused.name, "test", "operator")
        wait_until(lambda: learned(models), 60, "the paused model to catch up after its resume")
        assert (reader.rewinds, reader.reread) == (rewinds, reread), "a reload rewound the shared reader"
    finally:
        stop.set()
        pool.join(30)
        reader_thread.join(30)

    for m in models:
        taken = consumed(rt, m.id)
        assert len(taken) == len(set(taken)) and set(taken) == traffic.in_window[m.id], m.name
        assert not set(taken) & traffic.late
        report = rt.service.replayer.verify_stepwise(m.id)  # every recorded digest, by replay from genesis
        assert report.verified and report.updates_replayed > 0, (m.name, report)
