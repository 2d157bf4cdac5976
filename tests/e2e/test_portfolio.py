"""A portfolio of 100 models learned by two ``learnledger learn`` processes with shared workers.

Different specs (every learner kind, optimizer and several batch sizes), predictions and
labels spread over all of them, two learn processes of two workers each splitting the
models by advisory lock; one is SIGKILLed mid-stream and the other takes its models
over. One model's learner fails on every step (the ``LEARNLEDGER_FAULT_MODEL`` hook):
it is retried with backoff and never learns, and every other model learns every
in-window label exactly once. Connections per process stay bounded (counted in
``pg_stat_activity`` by application name). Then ``stage --fraction 0.25`` leaves exactly
25 models learning, on the record, and ``audit verify`` passes for all of them.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from domain.ledger import LabelRequest
from domain.model import Model
from domain.spec import LearnerSpec
from server.model_worker import FAULT_MODELS_VAR
from server.portfolio import stage_key
from tests.conftest import make_runtime
from tests.factories import prediction_events
from tests.processes import LearnProcess, run_audit

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


class Traffic:
    """Predictions and labels over every model, written through the ledger's fast paths."""

    def __init__(self, rt: Any, models: list[Model]):
        self.rt = rt
        self.models = models
        self.in_window: dict[uuid.UUID, set[uuid.UUID]] = {m.id: set() for m in models}
        self.late: set[uuid.UUID] = set()
        self.rounds = 0

    def round(self, per_model: int = 6, late: int = 1) -> None:
        """``per_model`` labeled predictions for every model (``late`` of them out of window)."""
        self.rounds += 1
        k = self.rounds
        now = datetime.now(UTC)

        def features(i: int) -> tuple[float, ...]:
            return (float(i % 3), float(k % 5), 1.0, -0.5)

        made = []
        for m in self.models:
            made += prediction_events(m, per_model, when=now, features=features)
        self.rt.ledger.record(made)
        requests = []
        for i, event in enumerate(made):
            model = self.models[i // per_model]
            j = i % per_model
            is_late = j < late
            when = now + timedelta(seconds=WINDOW_S + 60) if is_late else now
            requests.append(LabelRequest(event.originator_id, _label(model.spec, j + k), "traffic", when, "t"))
        outcomes = self.rt.ledger.prepare_labels(requests, received_at=datetime.now(UTC))
        self.rt.ledger.record([o.event for o in outcomes if o.event is not None])
        for o in outcomes:
            assert o.event is not None
            if o.event.in_window:
                self.in_window[o.event.model_id].add(o.prediction_id)
            else:
                self.late.add(o.prediction_id)


def _label(spec: LearnerSpec, i: int) -> float:
    if spec.head == "regression":
        return 0.25 * (i % 4)
    return float(i % spec.n_classes) if spec.head == "multiclass" else float(i % 2)


def consumed(rt: Any, model_id: uuid.UUID) -> list[uuid.UUID]:
    """Every labeled prediction a model's recorded batches took (trained or held out)."""
    out: list[uuid.UUID] = []
    for e in rt.ledger.get_model_events(model_id):
        if isinstance(e, (Model.UpdateApplied, Model.UpdateRejected)):
            out += [*e.prediction_ids, *getattr(e, "holdout_ids", ())]
    return out


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


def wait_until(check: Any, timeout: float, what: str) -> None:
    """Poll ``check()`` until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def events_of(proc: LearnProcess) -> list[dict[str, Any]]:
    """Every stdout line a learn process printed so far (drains its queue into a list)."""
    seen: list[dict[str, Any]] = getattr(proc, "seen", [])
    while not proc.lines.empty():
        seen.append(proc.lines.get()[1])
    proc.seen = seen  # type: ignore[attr-defined]
    return seen


def led_by(proc: LearnProcess) -> set[str]:
    """Model ids a process announced leading."""
    return {e["model_id"] for e in events_of(proc) if e.get("event") == "leading"}


@pytest.mark.slow
def test_portfolio_of_100_models_with_shared_workers(
    cli_env: dict[str, str], database_url: str, rt: Any, tmp_path: Path
) -> None:
    started = time.monotonic()
    models = [rt.service.register_model(f"m-{i:03d}", SPECS[i % len(SPECS)], "test") for i in range(N_MODELS)]
    faulty = next(m for m in models if m.name == FAULTY)
    healthy = [m for m in models if m is not faulty]
    traffic = Traffic(rt, models)
    traffic.round()  # a backlog before any learner runs

    apps = [f"ll-learn-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    env = dict(cli_env, PYTHONUNBUFFERED="1", **{FAULT_MODELS_VAR: FAULTY})
    log_path = tmp_path / "learn.log"
    a = LearnProcess(dict(env, PGAPPNAME=apps[0]), log_path, *LEARN_ARGS)
    b = LearnProcess(dict(env, PGAPPNAME=apps[1]), log_path, *LEARN_ARGS)
    sampler = ConnectionSampler(database_url, apps)
    sampler.thread.start()
    try:
        # Both processes lead a share, together all of them.
        wait_until(lambda: len(led_by(a) | led_by(b)) == N_MODELS, 120, "every model to be led")
        assert not led_by(a) & led_by(b), "a model was led by two processes at once"
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
