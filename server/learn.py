"""The ``learnledger learn`` command: learners as their own process, shared by many models.

A fixed pool of worker threads (``--workers``) leads any number of models
(``server.worker_pool``): one session holds every advisory lock this process won
(``server.election.LockSession``), one reader follows the log for all of them, and each
model's learner takes turns on the workers. Run as many ``learn`` processes as you
like: models are split between them by their locks, and a standby takes over the
models of a leader that dies. Running processes also rebalance (``server.balancer``,
``server.leadership``): one started later gets its fair share handed over by the others,
each model after its current turn committed, and resumes it from the log as after a
takeover. Pair it with ``learnledger serve --no-learner`` replicas, which follow the
updates it commits.

Connections stay bounded whatever the portfolio: the lock session, the LISTEN
connection, and the ledger's pool (at most ``POSTGRES_POOL_SIZE`` + overflow), all
named ``application_name=learnledger-learn`` unless ``PGAPPNAME`` says otherwise.

Prints one line per leadership change on stdout (one JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType
from typing import Any
from uuid import UUID

import orjson

from domain.errors import LedgerError
from domain.ledger import MODEL_REGISTERED_TOPIC, Ledger
from domain.spec import LearnerSpec

log = logging.getLogger("learnledger.learn")

APP_NAME = "learnledger-learn"
DISCOVER_S = 1.0
TICK_S = 0.2
ACQUIRE_PER_TICK = 16
# Balancing (``server.balancer.Balancer``): models handed over per tick when above the
# fair share; how long a free model waits for a peer below its share before anyone
# takes it; how long a handed-over model is left to the peers (several discover ticks).
SHED_PER_TICK = 4
ORPHAN_GRACE_S = 1.0
COOLDOWN_S = 5.0
LIVENESS_CHECK_S = 1.0
JOIN_TIMEOUT_S = 30.0
PAGE = 1000


def default_workers() -> int:
    """Two to four threads: XLA already uses more than one core per step."""
    return max(2, min(4, os.cpu_count() or 2))


def cmd_learn(args: argparse.Namespace) -> int:
    """Learn until SIGTERM/SIGINT; stopped workers finish their commit, then the locks are freed."""
    from server.balancer import Balancer
    from server.bootstrap import Settings, build
    from server.default_sweeper import DefaultSweeper
    from server.election import LockSession
    from server.leadership import Leadership
    from server.model_worker import COMMIT_DELAY_VAR, FAULT_MODELS_VAR, ModelRunner
    from server.worker_pool import LogDispatcher, WorkerPool

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every connection of this process (pool, LISTEN, locks) is then recognisable in
    # pg_stat_activity: how many a learner uses is an operations question.
    os.environ.setdefault("PGAPPNAME", APP_NAME)
    names = [n.strip() for n in (args.models or "").split(",") if n.strip()]
    workers = args.workers or default_workers()
    runtime = build(Settings.from_env())
    # --- metrics endpoint (server.metrics; --metrics-port, 0: off) ---
    from server.metrics import serve_learn_metrics

    serve_learn_metrics(runtime.service, getattr(args, "metrics_port", 0))
    ledger = runtime.ledger
    stop = threading.Event()
    out = _Printer(as_json=args.json)
    faults = frozenset(n.strip() for n in os.environ.get(FAULT_MODELS_VAR, "").split(",") if n.strip())
    if faults:
        log.warning("%s: the learners of %s will fail on purpose", FAULT_MODELS_VAR, ", ".join(sorted(faults)))
    kick = threading.Event()
    from server.alerts import Alerts

    alerts = Alerts(
        lambda model_id: ledger.get_model_by_id(model_id).name,
        getattr(args, "alert_webhook", None) or os.environ.get("LEARNLEDGER_ALERT_WEBHOOK") or None,
    )
    runner = ModelRunner(
        runtime.service,
        report=out,
        rewound=kick.set,
        commit_delay_s=float(os.environ.get(COMMIT_DELAY_VAR, "0") or 0),
        fault_models=faults,
        on_commit=alerts.observe,
    )
    pool = WorkerPool(runner, workers, stop, reader_kick=kick)
    reader = LogDispatcher(ledger, pool, stop, poll_interval_s=args.poll_interval)
    reader_thread = threading.Thread(target=reader.run, name="learn-reader", daemon=True)
    portfolio = _Portfolio(ledger, names, workers)
    locks = LockSession(ledger, group=names)
    balancer = Balancer(
        acquire_per_tick=ACQUIRE_PER_TICK,
        shed_per_tick=SHED_PER_TICK,
        orphan_grace_s=ORPHAN_GRACE_S,
        cooldown_s=COOLDOWN_S,
    )
    leadership = Leadership(locks, pool, balancer, out)
    sweeper = DefaultSweeper(ledger, pool.led)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the current commits, then stopping", signal.Signals(signum).name)
        stop.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    out({"event": "started", "models": names or "all", "workers": workers})
    pool.start()
    reader_thread.start()
    try:
        discovered = swept = checked = 0.0
        sealed = time.monotonic()  # the first seal after one period, not during start-up
        while not stop.is_set():
            now = time.monotonic()
            if now - discovered >= DISCOVER_S:
                discovered = now
                portfolio.discover()
            if locks.lost or (pool.busy() and now - checked >= LIVENESS_CHECK_S):
                checked = now
                if not locks.alive():
                    leadership.lost()
            leadership.tick(portfolio, now)
            if args.sweep_interval > 0 and now - swept >= args.sweep_interval:
                swept = now
                try:
                    sweeper.sweep()
                except Exception as exc:  # the database may be away; the next sweep retries
                    log.warning("default-label sweep failed: %s", exc)
            if args.seal_interval > 0 and now - sealed >= args.seal_interval:
                sealed = now
                _seal(runtime.service, out)
            stop.wait(TICK_S)
    finally:
        stop.set()
        pool.join(JOIN_TIMEOUT_S)
        reader_thread.join(JOIN_TIMEOUT_S)
        portfolio.close()
        locks.close()
        alerts.close()
        runtime.close()
        out(
            {
                "event": "stopped",
                "updates_committed": runner.updates_committed,
                "failures": runner.failures,
                "default_labels": sweeper.recorded,
                "reader_pages": reader.pages,
                "reader_rewinds": reader.rewinds,
            }
        )
    # Shut down cleanly: from here on a further SIGTERM/SIGINT is ignored. Keeping our
    # handler is not enough: interpreter finalization resets Python-level handlers to
    # SIG_DFL (but leaves SIG_IGN alone), so a second SIGTERM arriving while the process
    # exits killed it with -15 (the crash test sends one per process, twice).
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    return 0


def _seal(service: Any, out: Callable[[dict[str, Any]], None]) -> None:
    try:
        seal = service.seal("learner")
        if seal is not None:
            out({"event": "sealed", "first": seal.first, "last": seal.last, "seal": seal.seal})
    except LedgerError:
        pass  # another process sealed the same range first: nothing to do
    except Exception as exc:  # the database may be away; the next period retries
        log.warning("sealing failed: %s", exc)


class _Portfolio:
    """The models to learn, found incrementally in the log, each compiled before it competes.

    A model becomes a candidate for its lock only once its spec's step is compiled, so a
    standby takes a dead leader's models over in a fraction of a second instead of
    stalling them behind XLA. Compiling is per spec (``make_learner`` caches by spec),
    on a few threads.
    """

    def __init__(self, ledger: Ledger, names: list[str], threads: int):
        self.ledger = ledger
        self.names = frozenset(names)
        self.position = 0
        self.discovered = False  # read the whole log once
        self._models: dict[UUID, LearnerSpec | None] = {}
        self._compiled: dict[LearnerSpec, Future[None]] = {}
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="learn-compile")

    def discover(self) -> None:
        """Read the ``Model.Registered`` events committed since the last call."""
        try:
            while True:
                page = self.ledger.recorder.select_notifications(
                    self.position + 1, PAGE, topics=[MODEL_REGISTERED_TOPIC]
                )
                new: dict[LearnerSpec, UUID] = {}
                for notification in page:
                    self._found(notification, new)
                # In random order: processes starting together then compile (and so start
                # competing for) different models first, and split the portfolio.
                for spec, model_id in random.sample(list(new.items()), len(new)):
                    self._compiled[spec] = self._executor.submit(self._compile, model_id)
                if page:
                    self.position = page[-1].id
                if len(page) < PAGE:
                    self.discovered = True
                    return
        except Exception as exc:  # the database may be away; the next discovery retries
            log.warning("model discovery failed: %s", exc)

    def warmed(self) -> set[UUID]:
        """The models whose step is compiled (or failed to compile: that is the learner's to report)."""
        compiled = self._compiled
        return {m for m, spec in self._models.items() if spec is None or (spec in compiled and compiled[spec].done())}

    def models(self) -> frozenset[UUID]:
        """Every model found so far (compiled or not)."""
        return frozenset(self._models)

    def ready(self) -> bool:
        """Whether every model found is compiled: able to take any over at once."""
        return self.discovered and self.warmed() >= self._models.keys()

    def _found(self, notification: Any, new: dict[LearnerSpec, UUID]) -> None:
        try:
            event: Any = self.ledger.mapper.to_domain_event(notification)
        except Exception as exc:
            # Unreadable registration: lead it anyway, so its loads fail (and are retried)
            # visibly and in isolation instead of holding up discovery of every later model.
            log.error("cannot decode the registration of model %s: %s", notification.originator_id, exc)
            if not self.names:
                self._models[UUID(str(notification.originator_id))] = None
            return
        if self.names and event.name not in self.names:
            return
        self._models[event.originator_id] = event.spec
        if event.spec not in self._compiled:
            new.setdefault(event.spec, event.originator_id)

    def close(self) -> None:
        """Drop compilations not started yet."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _compile(self, model_id: UUID) -> None:
        from projections.learners import make_learner
        from projections.learning import ModelLearner

        try:
            model = self.ledger.get_model_by_id(model_id)
            ModelLearner(model, make_learner(model.spec).init()).warm_up()
        except Exception as exc:  # only a speed-up: a learner that cannot compile fails visibly later
            log.warning("could not pre-compile model %s's learner: %s", model_id, exc)


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
        "started": lambda: f"learnledger learn: started (models: {payload['models']}, workers: {payload['workers']})",
        "leading": lambda: (
            f"learnledger learn: leading model {payload['model']} "
            f"(version {payload['version']}, after log position {payload['position']})"
        ),
        "standby": lambda: f"learnledger learn: standing by for model {payload['model_id']}",
        "lost": lambda: f"learnledger learn: lost the lock of model {payload['model_id']}",
        "handed_over": lambda: f"learnledger learn: handed model {payload['model_id']} over to another learner",
        "group": lambda: (
            f"learnledger learn: {payload['members']} learn process(es) in the group; "
            f"fair share {payload['share']} model(s) each"
        ),
        "failed": lambda: (
            f"learnledger learn: model {payload['model_id']} failed ({payload['error']}); "
            f"retrying in {payload['retry_s']:.1f} s"
        ),
        "sealed": lambda: f"learnledger learn: sealed log positions {payload['first']}..{payload['last']}",
        "stopped": lambda: (
            f"learnledger learn: stopped ({payload['updates_committed']} updates, "
            f"{payload['failures']} failures, {payload['default_labels']} default labels)"
        ),
    }
    return texts.get(str(kind), lambda: str(payload))()
