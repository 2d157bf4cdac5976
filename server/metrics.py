"""Prometheus metrics of one process: a private registry, RPC and commit instruments, and a
projection of committed events into per-model counters and learner lag.

The registry is never ``prometheus_client.REGISTRY``: several servers in one process (the
tests, the demo) must not share or collide on metric names. The per-model figures are
derived from committed domain events (``MetricsProjection.observe``), the same facts
replay reads, so they agree with the log by construction; they count what *this
process* saw committed (its own writer, or the log it follows), starting when it started.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from server.auth import TokenTable

log = logging.getLogger(__name__)

# Unary calls take ~0.3-5 ms (ack after group commit); streams and replays much longer.
RPC_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMIT_EVENTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
COMMIT_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
# Label values come from events (reasons, detector names): cap them per model so that a
# reason string carrying figures cannot grow the series without bound.
MAX_LABEL_VALUES = 16
MAX_LABEL_LENGTH = 80
OTHER = "other"
# Unlearned labels tracked one by one per model (a paused model keeps receiving labels);
# beyond this they are only counted, see ``_Backlog``.
MAX_TRACKED_LABELS = 500_000


@dataclass
class _Backlog:
    """A model's labels committed but not yet taken by an update, oldest first.

    Keyed by the prediction id's 128-bit int (UUID hashing is Python code; this runs on
    the writer thread). Labels past ``MAX_TRACKED_LABELS`` are only counted in
    ``untracked``; the learner takes labels in commit order, so an update naming an id
    not tracked here is taken from that overflow (or was committed before this process
    started counting: the overflow never goes below zero).
    """

    labels: OrderedDict[int, datetime]
    untracked: int = 0

    def size(self) -> int:
        return len(self.labels) + self.untracked


class MetricsProjection:
    """Per-model counters and learner lag folded from committed domain events.

    Events are matched by class qualified name, not by class, so events added to the
    domain later (``Model.DriftDetected``) are counted once they exist and this module
    needs no import of them; unknown events are ignored (this is an observer, not a
    replay fold: it must never fail the commit path that feeds it).

    Args:
        model_name: resolves a model id to its name (called at scrape time only, and
            cached: a model's id is uuid5 of its name, so the mapping never changes).
        track_lag: expose learner lag. Only meaningful where the events that take
            labels (updates) are observed too: a server without its own learner sees
            labels but not the updates another process commits.
    """

    def __init__(self, model_name: Callable[[UUID], str] | None = None, *, track_lag: bool = True):
        self.model_name = model_name
        self.track_lag = track_lag
        self._lock = threading.Lock()
        self._names: dict[int, str] = {}
        self._predictions: dict[int, int] = {}
        self._labels: dict[tuple[int, str], int] = {}
        self._applied: dict[int, int] = {}
        self._rejected: dict[int, int] = {}
        self._gate: dict[tuple[int, str], int] = {}
        self._drift: dict[tuple[int, str], int] = {}
        self._backlog: dict[int, _Backlog] = {}
        self._values: dict[tuple[int, str], set[str]] = {}

    # --- observing (writer thread: keep it cheap) -------------------------------------

    def observe(self, events: Sequence[Any], _ids: Sequence[int] = ()) -> None:
        """Fold committed events in; usable directly as a ``GroupCommitWriter`` listener.

        Args:
            events: committed domain events, in commit order.
            _ids: their notification ids (unused; the listener signature).
        """
        with self._lock:  # one acquisition per transaction, not per event or per RPC
            predictions = self._predictions
            for event in events:
                kind = type(event).__qualname__
                if kind == "Prediction.Made":  # the bulk of the log: the shortest path
                    key = event.model_id.int
                    predictions[key] = predictions.get(key, 0) + 1
                elif kind == "Prediction.Labeled":
                    self._label(event, "in_window" if event.in_window else "late", event.in_window)
                elif kind == "Prediction.DefaultLabeled":
                    self._label(event, "default", True)
                elif kind == "Model.UpdateApplied":
                    key = event.originator_id.int
                    self._applied[key] = self._applied.get(key, 0) + 1
                    self._take(key, event)
                elif kind == "Model.UpdateRejected":
                    key = event.originator_id.int
                    self._rejected[key] = self._rejected.get(key, 0) + 1
                    self._take(key, event)
                    reason = self._value(key, "reason", str(getattr(event, "reason", "") or "unspecified"))
                    self._gate[key, reason] = self._gate.get((key, reason), 0) + 1
                elif kind == "Model.DriftDetected":
                    key = event.originator_id.int
                    detector = self._value(key, "detector", str(getattr(event, "detector", "") or "unspecified"))
                    self._drift[key, detector] = self._drift.get((key, detector), 0) + 1
                elif kind == "Model.Registered":
                    self._names[event.originator_id.int] = event.name

    def _label(self, event: Any, kind: str, learnable: bool) -> None:
        key = event.model_id.int
        self._labels[key, kind] = self._labels.get((key, kind), 0) + 1
        if not learnable or not self.track_lag:
            return
        backlog = self._backlog.get(key)
        if backlog is None:
            backlog = self._backlog[key] = _Backlog(OrderedDict())
        if backlog.untracked or len(backlog.labels) >= MAX_TRACKED_LABELS:
            backlog.untracked += 1
        else:
            backlog.labels[event.originator_id.int] = event.timestamp

    def _take(self, key: int, event: Any) -> None:
        # An update takes its batch and the holdout examples consumed with it (replayed
        # examples were taken earlier), and everything up to ``through`` in log order
        # (the fields exist once the gate lands; before that, the batch alone).
        backlog = self._backlog.get(key)
        if backlog is None:
            return
        labels = backlog.labels
        pop = labels.pop
        for ids in (event.prediction_ids, getattr(event, "holdout_ids", ())):
            for pid in ids:
                if pop(pid.int, None) is None and backlog.untracked:
                    backlog.untracked -= 1
        through = getattr(event, "through", None)
        if through is not None and through.int in labels:
            while labels.popitem(last=False)[0] != through.int:
                pass

    def _value(self, key: int, label: str, value: str) -> str:
        # The text before figures ("loss worse by 0.31 (t=4.2)" -> "loss worse by"), capped.
        value = value.split(":", 1)[0].split("(", 1)[0].strip()[:MAX_LABEL_LENGTH] or "unspecified"
        seen = self._values.setdefault((key, label), set())
        if value in seen:
            return value
        if len(seen) >= MAX_LABEL_VALUES:
            return OTHER
        seen.add(value)
        return value

    # --- reading (scrape thread) ---------------------------------------------------------

    def lag(self, model_id: UUID, now: float | None = None) -> tuple[int, float]:
        """Labels of ``model_id`` committed but not yet learned, and the age in seconds of the oldest.

        Args:
            model_id: the model.
            now: epoch seconds (default: the wall clock).

        Returns:
            ``(count, seconds)``; ``(0, 0.0)`` when nothing waits.
        """
        with self._lock:
            backlog = self._backlog.get(model_id.int)
            if backlog is None or not backlog.size():
                return 0, 0.0
            oldest = next(iter(backlog.labels.values()), None)
            size = backlog.size()
        age = 0.0 if oldest is None else max(0.0, (time.time() if now is None else now) - oldest.timestamp())
        return size, age

    def describe(self) -> Iterator[Metric]:
        """The metric families (without samples), for the registry's duplicate check."""
        yield from _Families.make(self.track_lag).all()

    def collect(self) -> Iterator[Metric]:
        """Prometheus ``Collector`` protocol: the current figures, labelled by model name."""
        with self._lock:
            predictions = dict(self._predictions)
            labels = dict(self._labels)
            applied, rejected = dict(self._applied), dict(self._rejected)
            gate, drift = dict(self._gate), dict(self._drift)
            keys = list(self._backlog)
        # Name lookups may read the database: outside the lock the writer thread takes.
        name = self._name
        f = _Families.make(self.track_lag)
        for key, n in predictions.items():
            f.predictions.add_metric([name(key)], n)
        for (key, kind), n in labels.items():
            f.labels.add_metric([name(key), kind], n)
        for key, n in applied.items():
            f.applied.add_metric([name(key)], n)
        for key, n in rejected.items():
            f.rejected.add_metric([name(key)], n)
        for (key, reason), n in gate.items():
            f.gate.add_metric([name(key), reason], n)
        for (key, detector), n in drift.items():
            f.drift.add_metric([name(key), detector], n)
        if f.lag_labels is not None and f.lag_seconds is not None:
            now = time.time()
            for key in keys:
                count, age = self.lag(UUID(int=key), now)
                f.lag_labels.add_metric([name(key)], count)
                f.lag_seconds.add_metric([name(key)], age)
        yield from f.all()

    def _name(self, key: int) -> str:
        found = self._names.get(key)
        if found is not None:
            return found
        model_id = UUID(int=key)
        try:
            found = self.model_name(model_id) if self.model_name is not None else str(model_id)
        except Exception as exc:  # the database may be away: show the id, try again next scrape
            log.debug("metrics: cannot resolve the name of model %s: %s", model_id, exc)
            return str(model_id)
        self._names[key] = found
        return found


class _Families(NamedTuple):
    """The metric families of one scrape of a ``MetricsProjection``."""

    predictions: CounterMetricFamily
    labels: CounterMetricFamily
    applied: CounterMetricFamily
    rejected: CounterMetricFamily
    gate: CounterMetricFamily
    drift: CounterMetricFamily
    lag_labels: GaugeMetricFamily | None
    lag_seconds: GaugeMetricFamily | None

    @staticmethod
    def make(track_lag: bool) -> _Families:
        """Empty families (lag gauges only with ``track_lag``)."""
        model, lag = ["model"], track_lag
        return _Families(
            CounterMetricFamily("learnledger_predictions", "Predictions committed, per model.", labels=model),
            CounterMetricFamily(
                "learnledger_labels",
                "Labels committed, per model and kind (in_window, late, default).",
                labels=["model", "kind"],
            ),
            CounterMetricFamily("learnledger_updates_applied", "Learner updates applied, per model.", labels=model),
            CounterMetricFamily(
                "learnledger_updates_rejected", "Learner updates rejected by a gate, per model.", labels=model
            ),
            CounterMetricFamily(
                "learnledger_gate_rejections", "Gate rejections, per model and reason.", labels=["model", "reason"]
            ),
            CounterMetricFamily(
                "learnledger_drift_detections",
                "Drift detections, per model and detector.",
                labels=["model", "detector"],
            ),
            GaugeMetricFamily(
                "learnledger_learner_lag_labels",
                "Learnable labels committed but not yet taken by an update, per model.",
                labels=model,
            )
            if lag
            else None,
            GaugeMetricFamily(
                "learnledger_learner_lag_seconds",
                "Age of the oldest learnable label not yet taken by an update, per model.",
                labels=model,
            )
            if lag
            else None,
        )

    def all(self) -> list[Metric]:
        """The families present, in a stable order."""
        return [f for f in self if f is not None]


class LedgerMetrics:
    """Every instrument of one server (or learner) process, on its own registry.

    Attributes:
        registry: the ``CollectorRegistry`` to expose.
        rpc_requests: RPCs completed, by service, method and status code.
        rpc_latency: RPC duration in seconds (streams: the whole stream), by service and method.
        commit_events: events per group-commit transaction.
        commit_latency: seconds per group-commit transaction (the COPY and COMMIT).
        events: the per-model projection of committed events.
    """

    def __init__(self, model_name: Callable[[UUID], str] | None = None, *, track_lag: bool = True):
        self.registry = CollectorRegistry()
        self.rpc_requests = Counter(
            "learnledger_rpc_requests",
            "RPCs completed, by service, method and status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.rpc_latency = Histogram(
            "learnledger_rpc_latency_seconds",
            "RPC duration in seconds (streams: until completion), by service and method.",
            ["service", "method"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.commit_events = Histogram(
            "learnledger_commit_batch_events",
            "Events per group-commit transaction.",
            buckets=COMMIT_EVENTS_BUCKETS,
            registry=self.registry,
        )
        self.commit_latency = Histogram(
            "learnledger_commit_latency_seconds",
            "Seconds per group-commit transaction.",
            buckets=COMMIT_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.events = MetricsProjection(model_name, track_lag=track_lag)
        self.registry.register(self.events)

    def observe_commit(self, events: int, seconds: float) -> None:
        """Record one committed transaction (the writer's ``on_transaction`` hook).

        Args:
            events: events in the transaction.
            seconds: time spent recording and committing it.
        """
        self.commit_events.observe(events)
        self.commit_latency.observe(seconds)


class MetricsEndpoint:
    """``/metrics`` over HTTP in the Prometheus text format, rendered by ``prometheus_client``.

    With a token table (``serve --tokens``) every scrape needs a bearer token with the
    ``audit`` role, as the dashboard does: per-model traffic, rejection and drift counts
    are operational data, and with tokens the server may listen beyond loopback. In
    Prometheus: ``authorization: {credentials: <token>}`` in the scrape config.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, tokens: TokenTable | None = None):
        """Listen on ``host:port`` (0: a free port) in a daemon thread."""
        address = host.strip("[]")
        if tokens is None:
            self._server, self._thread = start_http_server(port, addr=address, registry=registry)
        else:
            family = _Threading6WSGIServer if ":" in address else ThreadingWSGIServer
            app = _bearer_guard(make_wsgi_app(registry), tokens, METRICS_ROLE)
            self._server = make_server(address, port, app, family, handler_class=_QuietHandler)
            self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
            self._thread.start()
        self.host = host
        self.port: int = self._server.server_port

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


METRICS_ROLE = "audit"


class _Threading6WSGIServer(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood the log


def _bearer_guard(app: WSGIApplication, tokens: TokenTable, role: str) -> WSGIApplication:
    """``app`` behind ``Authorization: Bearer <token>``: 401 without a known token, 403 without ``role``."""

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        caller = tokens.lookup(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if caller is not None and role in caller.roles:
            return app(environ, start_response)
        status = "401 Unauthorized" if caller is None else "403 Forbidden"
        message = f"/metrics needs a token with the {role} role (Authorization: Bearer <token>)\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(message)))]
        if caller is None:
            headers.append(("WWW-Authenticate", 'Bearer realm="learnledger"'))
        start_response(status, headers)
        return [message]

    return guarded


def follow_log_metrics(ledger: Any, metrics: LedgerMetrics, stop: threading.Event) -> threading.Thread:
    """Feed ``metrics.events`` from the notification log (labels and model events) in a thread.

    For processes whose commits do not all pass through their own writer (``learnledger
    learn``): everything any process commits after now is counted. Predictions are left
    out (the log's bulk; the serving processes count them).

    Args:
        ledger: the ledger whose log to follow.
        metrics: where to count.
        stop: set to end the thread.

    Returns:
        The started daemon thread.
    """
    from eventsourcing.domain import Aggregate
    from eventsourcing.utils import get_topic

    from domain.model import Model
    from domain.prediction import DEFAULT_LABELED_TOPIC, LABELED_TOPIC
    from server.log_follower import LogFollower

    # Every Model event class, so ones added later (DriftDetected, …) are followed too.
    model_topics = [
        get_topic(c) for c in vars(Model).values() if isinstance(c, type) and issubclass(c, Aggregate.Event)
    ]

    def run() -> None:
        while not stop.is_set():
            try:
                after = ledger.recorder.max_notification_id() or 0
                topics = [LABELED_TOPIC, DEFAULT_LABELED_TOPIC, *model_topics]
                with LogFollower(ledger, topics, after=after) as follower:
                    for page in follower.follow(stop):
                        metrics.events.observe([event for _, event in page])
            except Exception as exc:  # the database may be away (or closing at exit): retry
                if not stop.is_set():
                    log.warning("metrics: following the log failed (%s); retrying", exc)
                    stop.wait(1.0)

    thread = threading.Thread(target=run, name="metrics-follower", daemon=True)
    thread.start()
    return thread


def serve_learn_metrics(service: Any, port: int, host: str = "127.0.0.1") -> MetricsEndpoint | None:
    """``learnledger learn --metrics-port N``: a log-fed projection behind ``/metrics`` (0: off).

    Args:
        service: the process's ``LedgerService``.
        port: the TCP port; 0 serves nothing.
        host: the interface to bind.

    Returns:
        The endpoint, or None when ``port`` is 0. Its threads are daemons: they end with
        the process.
    """
    if not port:
        return None
    ledger = service.ledger
    metrics = LedgerMetrics(lambda model_id: str(ledger.get_model_by_id(model_id).name))
    follow_log_metrics(ledger, metrics, threading.Event())
    endpoint = MetricsEndpoint(metrics.registry, host, port)
    log.info("metrics on http://%s:%d/metrics (pid %d)", host, endpoint.port, os.getpid())
    return endpoint
