"""The ``learnledger learn`` command: learners as their own process, one leader per model.

Each model gets a worker thread that waits for the model's advisory lock and, once
elected, learns from the log (``server.model_worker``). Run as many ``learn`` processes
as you like: one leads each model, the others wait and take over when it dies. Pair
it with ``learnledger serve --no-learner`` replicas, which follow the updates it commits.

Prints one line per leadership change on stdout (one JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any
from uuid import UUID

import orjson

from domain.errors import LedgerError

log = logging.getLogger("learnledger.learn")

DISCOVER_S = 1.0
TICK_S = 0.2
JOIN_TIMEOUT_S = 30.0


def cmd_learn(args: argparse.Namespace) -> int:
    """Learn until SIGTERM/SIGINT; a stopped worker finishes its commit and frees its lock."""
    from domain.errors import ModelNotFoundError
    from server.bootstrap import Settings, build
    from server.default_sweeper import DefaultSweeper
    from server.model_worker import ModelWorker

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [n.strip() for n in (args.models or "").split(",") if n.strip()]
    runtime = build(Settings.from_env())
    ledger = runtime.ledger
    stop = threading.Event()
    out = _Printer(as_json=args.json)
    workers: dict[UUID, tuple[ModelWorker, threading.Thread]] = {}

    def led() -> frozenset[UUID]:
        return frozenset(mid for mid, (w, _) in workers.items() if w.leading.is_set())

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the current commit, then stopping", signal.Signals(signum).name)
        stop.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    sweeper = DefaultSweeper(ledger, led)
    out({"event": "started", "models": names or "all"})
    try:
        discovered = swept = 0.0
        sealed = time.monotonic()  # the first seal after one period, not during start-up
        while not stop.is_set():
            now = time.monotonic()
            if now - discovered >= DISCOVER_S:
                discovered = now
                for model_id in _model_ids(ledger, names, ModelNotFoundError):
                    if model_id not in workers:
                        worker = ModelWorker(
                            runtime.service, model_id, stop, report=out, poll_interval_s=args.poll_interval
                        )
                        thread = threading.Thread(target=worker.run, name=f"learn-{model_id}", daemon=True)
                        workers[model_id] = (worker, thread)
                        thread.start()
            if args.sweep_interval > 0 and now - swept >= args.sweep_interval:
                swept = now
                try:
                    sweeper.sweep()
                except Exception as exc:  # the database may be away; the next sweep retries
                    log.warning("default-label sweep failed: %s", exc)
            if args.seal_interval > 0 and now - sealed >= args.seal_interval:
                sealed = now
                try:
                    seal = runtime.service.seal("learner")
                    if seal is not None:
                        out({"event": "sealed", "first": seal.first, "last": seal.last, "seal": seal.seal})
                except LedgerError:
                    pass  # another process sealed the same range first: nothing to do
                except Exception as exc:  # the database may be away; the next period retries
                    log.warning("sealing failed: %s", exc)
            stop.wait(TICK_S)
        for _, thread in workers.values():
            thread.join(JOIN_TIMEOUT_S)
    finally:
        runtime.close()
        out(
            {
                "event": "stopped",
                "updates_committed": sum(w.updates_committed for w, _ in workers.values()),
                "default_labels": sweeper.recorded,
            }
        )
    # The handlers stay: a SIGTERM arriving while this process exits must not turn a clean
    # shutdown into a kill (the command is the process; nothing runs after it).
    return 0


def _model_ids(ledger: Any, names: list[str], not_found: type[Exception]) -> list[UUID]:
    if not names:
        return [m.id for m in ledger.list_models()]
    ids = []
    for name in names:
        # A name not registered yet is looked for again at the next discovery.
        with contextlib.suppress(not_found):
            ids.append(ledger.get_model(name).id)
    return ids


class _Printer:
    """Thread-safe stdout lines: JSON objects, or ``learnledger learn: …`` text."""

    def __init__(self, *, as_json: bool):
        self.as_json = as_json
        self._lock = threading.Lock()

    def __call__(self, payload: dict[str, Any]) -> None:
        line = orjson.dumps(payload).decode() if self.as_json else _text(payload)
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def _text(payload: dict[str, Any]) -> str:
    kind = payload.get("event")
    texts: dict[str, Callable[[], str]] = {
        "started": lambda: f"learnledger learn: started (models: {payload['models']})",
        "leading": lambda: (
            f"learnledger learn: leading model {payload['model']} "
            f"(version {payload['version']}, after log position {payload['position']})"
        ),
        "standby": lambda: f"learnledger learn: standing by for model {payload['model_id']}",
        "lost": lambda: f"learnledger learn: lost the lock of model {payload['model_id']}",
        "sealed": lambda: f"learnledger learn: sealed log positions {payload['first']}..{payload['last']}",
        "stopped": lambda: (
            f"learnledger learn: stopped ({payload['updates_committed']} updates, "
            f"{payload['default_labels']} default labels)"
        ),
    }
    return texts.get(str(kind), lambda: str(payload))()
