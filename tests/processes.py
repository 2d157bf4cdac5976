"""Helpers for tests that run ``learnledger learn`` / ``serve`` as real subprocesses,
and write a stream of predictions and labels straight through the ledger."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from domain.ledger import LabelRequest, Ledger
from domain.model import Model
from domain.prediction import make_prediction_event
from domain.spec import LearnerSpec
from tests.factories import prediction_events

LISTENING = re.compile(r"listening on (\S+)")


class LearnProcess:
    """A ``learnledger learn --json`` subprocess whose stdout lines are collected."""

    def __init__(self, env: dict[str, str], log_path: Path, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "learn", "--json", *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log_path.open("a"),
            text=True,
        )
        self.lines: queue.SimpleQueue[tuple[float, dict[str, Any]]] = queue.SimpleQueue()
        self.led_at: float | None = None
        self.standby = False  # compiled and waiting for the lock
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                payload = json.loads(line)
            except json.JSONDecodeError:
                continue
            if payload.get("event") == "leading" and self.led_at is None:
                self.led_at = time.monotonic()
            if payload.get("event") == "standby":
                self.standby = True
            self.lines.put((time.monotonic(), payload))

    @property
    def leading(self) -> bool:
        """Whether it announced leadership and is still alive."""
        return self.led_at is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def wait_for_leader(procs: list[LearnProcess], timeout: float = 60.0) -> LearnProcess:
    """The (alive) process that leads, waiting for one to announce it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.leading:
                return p
        time.sleep(0.02)
    raise AssertionError("no learn process became leader")


def wait_for_standby(procs: list[LearnProcess], timeout: float = 60.0) -> None:
    """Wait until some alive, non-leading process stands by (compiled, polling the lock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.standby and not p.leading and p.proc.poll() is None for p in procs):
            return
        time.sleep(0.02)
    raise AssertionError("no learn process is standing by")


def start_serve(env: dict[str, str], log_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``learnledger serve --port 0 …``; return the process and its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", "0", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log_path.open("a"),
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = LISTENING.search(line)
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"server did not start: {log_path.read_text()[-2000:]}")


@dataclass
class Stream:
    """Writes predictions and their labels through the ledger, as a serving process would.

    Of every ``per_round`` predictions, ``late`` get a label outside the feedback window
    and ``silent`` get none (a default label, if the spec declares one, covers them).
    """

    ledger: Ledger
    model: Model
    per_round: int = 20
    late: int = 2
    silent: int = 2
    interval_s: float = 0.05
    stop: threading.Event = field(default_factory=threading.Event)
    labeled: dict[uuid.UUID, bool] = field(default_factory=dict)  # id -> in window
    silent_ids: list[uuid.UUID] = field(default_factory=list)
    label_commit_times: dict[uuid.UUID, float] = field(default_factory=dict)

    def run(self, rounds: int | None = None) -> None:
        """Write rounds until ``stop`` (or ``rounds``)."""
        spec: LearnerSpec = self.model.spec
        k = 0
        while not self.stop.is_set() and (rounds is None or k < rounds):
            k += 1
            now = datetime.now(UTC)
            made = [
                make_prediction_event(
                    uuid.uuid4(),
                    model_id=self.model.id,
                    model_name=self.model.name,
                    model_version=1,
                    spec=spec,
                    features=[float(k % 7), float(i), 1.0, -0.5][: spec.n_features],
                    score=0.5,
                    decision=0.0,
                    params_digest="-",
                    routing="champion",
                    actor="stream",
                    timestamp=now,
                )
                for i in range(self.per_round)
            ]
            self.ledger.record(made)
            requests = []
            for i, event in enumerate(made[: self.per_round - self.silent]):
                late = i < self.late
                when = now + timedelta(seconds=spec.feedback_window_s + 60) if late else now
                requests.append(LabelRequest(event.originator_id, float((k + i) % 2), "stream", when, "stream"))
            outcomes = self.ledger.prepare_labels(requests, received_at=datetime.now(UTC))
            self.ledger.record([o.event for o in outcomes if o.event is not None])
            committed = time.monotonic()
            for o in outcomes:
                assert o.event is not None
                self.labeled[o.prediction_id] = o.event.in_window
                self.label_commit_times[o.prediction_id] = committed
            self.silent_ids.extend(e.originator_id for e in made[self.per_round - self.silent :])
            self.stop.wait(self.interval_s)


def learned_batches(ledger: Ledger, model_id: uuid.UUID) -> list[tuple[uuid.UUID, ...]]:
    """The recorded batches (applied and rejected) of a model, in version order."""
    return [
        e.prediction_ids
        for e in ledger.get_model_events(model_id)
        if isinstance(e, (Model.UpdateApplied, Model.UpdateRejected))
    ]


def default_labeled(ledger: Ledger, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``ids`` got a default label."""
    found = ledger.get_predictions(ids)
    return {pid for pid, p in found.items() if p.defaulted}


def run_audit(env: dict[str, str]) -> dict[str, Any]:
    """``learnledger audit verify --json``: exit code 0 and the parsed payload."""
    audit = subprocess.run(
        [sys.executable, "-m", "server.cli", "audit", "verify", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    payload: dict[str, Any] = json.loads(audit.stdout)
    return payload


def consumed(rt: Any, model_id: uuid.UUID) -> list[uuid.UUID]:
    """Every labeled prediction a model's recorded batches took (trained or held out)."""
    out: list[uuid.UUID] = []
    for e in rt.ledger.get_model_events(model_id):
        if isinstance(e, (Model.UpdateApplied, Model.UpdateRejected)):
            out += [*e.prediction_ids, *getattr(e, "holdout_ids", ())]
    return out


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check()`` until true; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def events_of(proc: LearnProcess) -> list[dict[str, Any]]:
    """Every stdout line a learn process printed so far, in order (drains its queue into a list)."""
    seen: list[dict[str, Any]] = getattr(proc, "seen", [])
    while not proc.lines.empty():
        seen.append(proc.lines.get()[1])
    proc.seen = seen  # type: ignore[attr-defined]
    return seen


def led_by(proc: LearnProcess) -> set[str]:
    """The models a process leads now, by its own account (``leading`` until handed over or lost)."""
    led: set[str] = set()
    for e in events_of(proc):
        if e.get("event") == "leading":
            led.add(e["model_id"])
        elif e.get("event") in ("handed_over", "lost"):
            led.discard(e["model_id"])
    return led


class Traffic:
    """Predictions and labels over every model, written through the ledger's fast paths.

    Labels dated ``window_s + 60`` s after their prediction are late (out of window).
    """

    def __init__(self, rt: Any, models: list[Model], *, window_s: float):
        self.rt = rt
        self.models = models
        self.window_s = window_s
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
            when = now + timedelta(seconds=self.window_s + 60) if is_late else now
            requests.append(LabelRequest(event.originator_id, _label(model.spec, j + k), "traffic", when, "t"))
        outcomes = self.rt.ledger.prepare_labels(requests, received_at=datetime.now(UTC))
        self.rt.ledger.record([o.event for o in outcomes if o.event is not None])
        for o in outcomes:
            assert o.event is not None
            if o.event.in_window:
                self.in_window[o.event.model_id].add(o.prediction_id)
            else:
                self.late.add(o.prediction_id)

    def learned(self, models: list[Model] | None = None) -> bool:
        """Whether every in-window label so far is in a recorded batch of its model."""
        return all(set(consumed(self.rt, m.id)) >= self.in_window[m.id] for m in models or self.models)


def _label(spec: LearnerSpec, i: int) -> float:
    if spec.head == "regression":
        return 0.25 * (i % 4)
    return float(i % spec.n_classes) if spec.head == "multiclass" else float(i % 2)
