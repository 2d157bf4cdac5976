"""Build, start and stop the gRPC server: writer, learner loop, servicer, health, reflection."""

from __future__ import annotations

import gc
import ipaddress
import logging
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from learnledger.v1 import ledger_pb2, ledger_pb2_grpc
from server.alerts import Alerts
from server.auth import AuthInterceptor, TokenTable
from server.catalog import ModelCatalog
from server.dashboard import Dashboard
from server.learner_loop import LearnerLoop
from server.metrics import LedgerMetrics, MetricsEndpoint
from server.metrics_interceptor import MetricsInterceptor
from server.replica import ReplicaFollower
from server.servicer import LedgerServicer
from server.services import LedgerService
from server.serving import ServingService
from server.writer import GroupCommitWriter

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
GC_YOUNG_THRESHOLD = 50_000
PRE_ENCODED_RPCS = frozenset({"PredictBatch"})
SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["Ledger"].full_name


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs (never what it computes).

    Attributes:
        host: interface to bind; forced to loopback when ``tokens`` is None.
        port: TCP port; 0 picks a free one.
        tokens: the token table, or None to run without authentication.
        tls_cert: PEM certificate chain; with ``tls_key`` the port serves TLS only.
        tls_key: PEM private key.
        learner: run the learner loop in this process.
        follow_log: fold model events other processes commit (a ``learn`` process,
            operators, other replicas) into the served heads (invariant 8).
        max_message_bytes: larger messages are refused with RESOURCE_EXHAUSTED.
        workers: RPC handler threads (each in-flight unary call holds one while it waits
            for its commit, so this bounds the concurrency the writer can batch).
        max_batch_events: most events per group-commit transaction.
        tune_gc: once started, move everything alive (modules, JAX, compiled
            functions) out of the collector's sight and collect the young generation
            less often: the serving path allocates many short-lived containers and
            full collections over JAX's object graph cost ~5% of the server's CPU.
        metrics_port: serve Prometheus ``/metrics`` on this port of ``host`` (0: a
            free one); None serves no endpoint (the metrics are still kept).
        http_port: serve the read-only operator dashboard (``server.dashboard``) on
            this port of ``host`` (0: a free one), with the same tokens and TLS files
            as gRPC; None serves none.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    tokens: TokenTable | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    learner: bool = True
    follow_log: bool = True
    max_message_bytes: int = MAX_MESSAGE_BYTES
    workers: int = 128
    max_batch_events: int = 1000
    tune_gc: bool = True
    metrics_port: int | None = None
    http_port: int | None = None
    alert_webhook: str | None = None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LedgerServer:
    """A running ``learnledger.v1.Ledger`` server over one ``LedgerService``."""

    def __init__(self, service: LedgerService, settings: ServerSettings):
        self.service = service
        self.settings = settings
        self.stopping = threading.Event()
        self.writer = GroupCommitWriter(service.ledger, max_events=settings.max_batch_events)
        self.catalog = ModelCatalog(service)
        self.learner = LearnerLoop(service, self.writer, self.catalog) if settings.learner else None
        self.replica = ReplicaFollower(service, self.catalog) if settings.follow_log else None
        if self.learner is not None:
            self.writer.add_listener(self.learner.on_commit)
        # --- metrics (server.metrics): lag only where this process's learner takes labels
        self.metrics = LedgerMetrics(
            lambda model_id: service.ledger.get_model_by_id(model_id).name, track_lag=settings.learner
        )
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.dashboard: Dashboard | None = None
        self.writer.on_transaction = self.metrics.observe_commit
        self.writer.add_listener(self.metrics.events.observe)
        # --- alerts (server.alerts): drift, aborted rollouts, rebaselines
        self.alerts = Alerts(lambda model_id: service.ledger.get_model_by_id(model_id).name, settings.alert_webhook)
        self.writer.add_listener(self.alerts.observe)
        self.serving = ServingService(service, self.writer, self.catalog)
        self.health = health.HealthServicer()
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
            # One interceptor, one cached wrapper per method: interceptors run on the sync
            # server's single event thread, for every call. Auth runs inside the metrics
            # wrapper, so the calls it refuses are counted and logged too.
            interceptors=[MetricsInterceptor(self.metrics, auth=AuthInterceptor(settings.tokens))],
            options=options,
            maximum_concurrent_rpcs=settings.workers * 8,
        )
        servicer = LedgerServicer(service, self.serving, self.catalog, self.learner, self.stopping)
        ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, _PreEncodedReplies(self.grpc, PRE_ENCODED_RPCS))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.host = settings.host if settings.tokens is not None or is_loopback(settings.host) else "127.0.0.1"
        if self.host != settings.host:
            log.warning(
                "no tokens file: authentication is off, so binding to loopback %s instead of %s",
                self.host,
                settings.host,
            )
        elif settings.tokens is None:
            log.warning("no tokens file: authentication is off; listening on loopback only (%s)", self.host)
        address = f"{self.host}:{settings.port}"
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])
            self.port = self.grpc.add_secure_port(address, credentials)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Start the writer, recover and start the learner, then take traffic."""
        # First: a port in use then fails the start before any thread runs.
        if self.settings.metrics_port is not None:
            self.metrics_endpoint = MetricsEndpoint(
                self.metrics.registry, self.host, self.settings.metrics_port, tokens=self.settings.tokens
            )
            log.info("metrics on http://%s:%d/metrics", self.host, self.metrics_endpoint.port)
        # --- operator dashboard (server.dashboard): started and stopped with the server
        if self.settings.http_port is not None:
            self.dashboard = self._start_dashboard(self.settings.http_port)
        self.writer.start()
        if self.learner is not None:
            self.learner.recover()
            self.learner.start()
        if self.replica is not None:
            self.replica.start()
        if self.settings.tune_gc:
            gc.collect()
            gc.freeze()
            gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)
        self.grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("learnledger serving on %s", self.address)

    def stop(self, grace: float = 10.0) -> None:
        """Graceful stop: no new calls, in-flight calls finish, queued events commit.

        Order matters: RPCs first (their events are queued or committing), then the
        learner (it may still submit updates), then the writer (drains the queue).
        """
        self.health.enter_graceful_shutdown()
        self.stopping.set()
        if self.dashboard is not None:  # read-only: nothing of it needs to drain
            self.dashboard.close()
        with self.catalog.changed:
            self.catalog.changed.notify_all()
        self.grpc.stop(grace).wait()
        if self.learner is not None:
            self.learner.stop()
        if self.replica is not None:
            self.replica.stop()
        self.writer.close()
        self.alerts.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        log.info(
            "learnledger stopped: %d events in %d transactions",
            self.writer.stats.events,
            self.writer.stats.transactions,
        )

    def wait(self) -> None:
        """Block until the gRPC server terminates."""
        self.grpc.wait_for_termination()

    def _start_dashboard(self, port: int) -> Dashboard:
        # Same interface, tokens and TLS files as gRPC: no weaker way in to the same data.
        s = self.settings
        tls = (s.tls_cert, s.tls_key) if s.tls_cert is not None and s.tls_key is not None else None
        dashboard = Dashboard(self.service, self.host, port, s.tokens, tls=tls)
        log.info("operator dashboard on %s/", dashboard.url)
        return dashboard


class _PreEncodedReplies:
    """Registers the generated handlers, letting the named RPCs reply with ready-made bytes.

    A 256-row ``PredictBatchResponse`` built message by message costs ~4 µs a row of
    Python; the servicer encodes it with numpy instead (``servicer.predict_batch_bytes``)
    and the serializer passes such bytes through unchanged (messages still serialize).
    """

    def __init__(self, server: grpc.Server, rpcs: frozenset[str]):
        self.server = server
        self.rpcs = rpcs

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Unused: the handlers are registered once, below, with the adjusted serializers."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Register ``handlers`` (generic and registered) with pass-through serializers for ``rpcs``."""
        adjusted = {name: _pass_bytes(h) if name in self.rpcs else h for name, h in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, adjusted),))
        self.server.add_registered_method_handlers(service, adjusted)


def _pass_bytes(handler: Any) -> grpc.RpcMethodHandler:
    serialize = handler.response_serializer

    def serializer(reply: Any) -> bytes:
        return reply if isinstance(reply, bytes) else serialize(reply)

    return grpc.unary_unary_rpc_method_handler(handler.unary_unary, handler.request_deserializer, serializer)


def build_server(service: LedgerService, settings: ServerSettings) -> LedgerServer:
    """A configured, not yet started server."""
    return LedgerServer(service, settings)
