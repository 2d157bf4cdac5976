"""``learnledger ingest``: feedback from a NATS JetStream durable consumer, acked only after commit.

At-least-once delivery plus idempotent labels gives each label applied once: a message
is acknowledged only after its label event (or its dead letter) is durably stored, so a
crash anywhere before the ack redelivers it, and the redelivery is then a DUPLICATE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from domain.errors import PredictionNotFoundError
from domain.ledger import LabelOutcome, LabelRequest, LabelStatus, Ledger
from server.errors import status_for
from server.feedback_messages import Rejection, dead_letter_body, decode_feedback
from server.label_batches import LabelResult, commit_labels
from server.nats_topology import IngestSetupError, Topology, ensure_topology

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestConfig:
    """How the ingester talks to NATS; none of it changes what a label records.

    ``max_deliver`` bounds the deliveries of a label whose prediction is not in the log
    (then it is dead-lettered NOT_FOUND); each retry waits ``retry_delay_s`` doubled per
    delivery, up to ``max_retry_delay_s``. ``ack_wait_s`` only applies to a consumer this
    process creates; an existing one keeps its own.
    """

    subject: str
    servers: str = "nats://127.0.0.1:4222"
    stream: str | None = None
    durable: str = "learnledger-ingest"
    dead_letter: str | None = None
    batch: int = 256
    max_deliver: int = 5
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = 30.0
    retry_delay_s: float = 1.0
    max_retry_delay_s: float = 30.0
    commit_attempts: int = 5


@dataclass
class IngestTally:
    """What happened to the messages received so far (the ``--once`` summary).

    ``received`` counts deliveries: a message retried twice and then committed counts
    three times there, twice in ``retried`` and once in ``accepted``.
    """

    received: int = 0
    accepted: int = 0
    duplicate: int = 0
    late: int = 0
    dead_lettered: int = 0
    retried: int = 0

    def to_json(self) -> dict[str, int]:
        """The summary as a JSON object."""
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """What to do with one message once its batch is committed."""

    action: Literal["ack", "retry", "dead_letter"]
    status: LabelStatus | None = None
    code: str = ""
    reason: str = ""


@dataclass
class FeedbackIngester:
    """Fetch a batch, validate and commit its labels in one transaction, then settle each message."""

    ledger: Ledger
    nc: NATS
    js: JetStreamContext
    subscription: JetStreamContext.PullSubscription
    topology: Topology
    config: IngestConfig
    tally: IngestTally = field(default_factory=IngestTally)

    async def step(self) -> int:
        """Handle one batch; returns how many messages it held (0: none came within the timeout)."""
        try:
            msgs = await self.subscription.fetch(self.config.batch, timeout=self.config.fetch_timeout_s)
        except TimeoutError:  # nats' own TimeoutError subclasses the builtin one
            return 0
        self.tally.received += len(msgs)
        try:
            verdicts = await self.handle(msgs)
        except BaseException:
            # Nothing of this batch is acked: hand it back now rather than after ack_wait.
            await self._retry_all(msgs)
            raise
        await self.settle(msgs, verdicts)
        return len(msgs)

    async def handle(self, msgs: Sequence[Msg]) -> list[Verdict]:
        """Decode, validate and commit; returns a verdict per message and touches no message.

        Everything this decides is durable before ``settle`` acks: the label events here,
        the dead letters in ``settle`` before their message's ack.
        """
        received_at = datetime.now(UTC)
        decoded = [decode_feedback(m.data, actor=f"nats:{m.subject}", default_time=m.metadata.timestamp) for m in msgs]
        requests = [d for d in decoded if isinstance(d, LabelRequest)]
        # The ledger is synchronous (psycopg); a worker thread keeps the NATS client's
        # pings and heartbeats flowing while a transaction runs.
        results = iter(
            await asyncio.to_thread(
                commit_labels, self.ledger, requests, received_at=received_at, attempts=self.config.commit_attempts
            )
        )
        return [
            self._verdict(m, next(results)) if isinstance(d, LabelRequest) else _rejected(d)
            for m, d in zip(msgs, decoded, strict=True)
        ]

    async def settle(self, msgs: Sequence[Msg], verdicts: Sequence[Verdict]) -> None:
        """Dead-letter, ack or retry each message, then flush so the acks have left."""
        for msg, verdict in zip(msgs, verdicts, strict=True):
            if verdict.action == "retry":
                await self._retry(msg)
            elif verdict.action == "dead_letter":
                try:
                    await self._dead_letter(msg, verdict)
                except (nats.errors.Error, TimeoutError) as exc:
                    # Not stored anywhere yet, so it must not be acked: try again later.
                    log.warning("dead letter for %s not stored (%s); will retry", msg.subject, exc)
                    await self._retry(msg)
                    continue
                await msg.ack()
                self.tally.dead_lettered += 1
            else:
                await msg.ack()
                self._count(verdict.status)
        await self.nc.flush()

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> IngestTally:
        """Handle batches until ``stop`` is set (a batch in hand is finished first).

        Args:
            stop: set by a signal handler or a test to end the loop between batches.
            once: end as soon as a fetch finds nothing (drain what is available).

        Returns:
            The tally of everything handled.
        """
        failures = 0
        while not stop.is_set():
            try:
                handled = await self.step()
            except Exception as exc:
                # Store or broker trouble (or a bug): whatever was not acked yet is handed
                # back or redelivered after ack_wait, so nothing is lost by carrying on; a
                # one-shot run reports it instead.
                if once:
                    raise
                failures += 1
                delay = min(self.config.retry_delay_s * 2 ** min(failures, 10), self.config.max_retry_delay_s)
                log.warning("ingest batch failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
                await _sleep_unless(stop, delay)
                continue
            failures = 0
            if once and handled == 0:
                break
        return self.tally

    def _verdict(self, msg: Msg, result: LabelResult) -> Verdict:
        if isinstance(result, LabelOutcome):
            return Verdict("ack", status=result.status)
        if isinstance(result, PredictionNotFoundError):
            delivered = msg.metadata.num_delivered
            if delivered < self.config.max_deliver:
                # The prediction may still be committing (a label can overtake it).
                return Verdict("retry", reason=str(result))
            return Verdict("dead_letter", code="NOT_FOUND", reason=f"{result} after {delivered} deliveries")
        return Verdict("dead_letter", code=status_for(result).name, reason=str(result))

    async def _dead_letter(self, msg: Msg, verdict: Verdict) -> None:
        meta = msg.metadata
        body = dead_letter_body(
            msg.data,
            reason=verdict.reason,
            code=verdict.code,
            subject=msg.subject,
            stream_seq=meta.sequence.stream,
            num_delivered=meta.num_delivered,
        )
        # JetStream drops a repeat of the same Nats-Msg-Id within its duplicate window,
        # so a crash between this publish and the ack does not dead-letter twice.
        msg_id = f"learnledger:{meta.stream}:{meta.sequence.stream}"
        await self.js.publish(self.topology.dead_letter_subject, body, headers={"Nats-Msg-Id": msg_id})

    async def _retry(self, msg: Msg) -> None:
        # Exponential delay by delivery count: 1, 2, 4 … × retry_delay_s, capped.
        exponent = max(msg.metadata.num_delivered - 1, 0)
        await msg.nak(delay=min(self.config.retry_delay_s * 2**exponent, self.config.max_retry_delay_s))
        self.tally.retried += 1

    async def _retry_all(self, msgs: Sequence[Msg]) -> None:
        try:
            for msg in msgs:
                await self._retry(msg)
            await self.nc.flush()
        except (nats.errors.Error, TimeoutError, OSError):
            pass  # ack_wait will redeliver them anyway

    def _count(self, status: LabelStatus | None) -> None:
        if status is LabelStatus.ACCEPTED:
            self.tally.accepted += 1
        elif status is LabelStatus.DUPLICATE:
            self.tally.duplicate += 1
        elif status is LabelStatus.LATE:
            self.tally.late += 1


async def open_ingester(ledger: Ledger, config: IngestConfig) -> FeedbackIngester:
    """Connect to NATS, create the stream, dead-letter stream and durable consumer if missing.

    Raises:
        IngestSetupError: NATS cannot be reached, or the existing stream or consumer does
            not fit the request (see ``server.nats_topology``).
    """
    connected = False

    async def report(exc: Exception) -> None:
        # The client's default prints a traceback per failed attempt; one line is enough,
        # and none before the first connection (that failure is raised, once, below).
        if connected:
            log.warning("NATS: %s", exc)

    try:
        # Fail fast when NATS is not there at start (the default retries for ~2 minutes)…
        nc = await nats.connect(
            config.servers,
            name="learnledger-ingest",
            error_cb=report,
            connect_timeout=2,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.5,
        )
    except (nats.errors.Error, OSError) as exc:
        raise IngestSetupError(f"cannot reach NATS at {config.servers}: {exc}") from None
    # … but once running, ride out broker restarts for as long as they take.
    nc.options["max_reconnect_attempts"] = -1
    connected = True
    try:
        js = nc.jetstream()
        topology = await ensure_topology(js, config)
        subscription = await js.pull_subscribe_bind(durable=config.durable, stream=topology.stream)
    except BaseException:
        await nc.close()
        raise
    return FeedbackIngester(ledger, nc, js, subscription, topology, config)


async def run_ingest(ledger: Ledger, config: IngestConfig, *, once: bool) -> IngestTally:
    """Run the ingester until SIGTERM/SIGINT (or, with ``once``, until nothing is left)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ingester = await open_ingester(ledger, config)
    try:
        return await ingester.run(stop, once=once)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await ingester.nc.close()  # flushes what is pending (the last acks) first


def cmd_ingest(args: argparse.Namespace) -> int:
    """``learnledger ingest --nats URL --subject SUBJ [...]``."""
    from server.bootstrap import runtime
    from server.cli import CliError, emit

    config = IngestConfig(
        subject=args.subject,
        servers=args.nats,
        stream=args.stream,
        durable=args.durable,
        dead_letter=args.dead_letter,
        batch=args.batch,
        max_deliver=args.max_deliver,
    )
    with runtime() as rt:
        try:
            tally = asyncio.run(run_ingest(rt.ledger, config, once=args.once))
        except IngestSetupError as exc:
            raise CliError(str(exc)) from None
    summary: dict[str, Any] = tally.to_json()
    emit(args, summary, "ingested: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def _rejected(rejection: Rejection) -> Verdict:
    return Verdict("dead_letter", code=rejection.code, reason=rejection.reason)
