"""The JetStream objects the ingester needs: feedback stream, dead-letter stream, durable consumer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import APIError, NotFoundError

if TYPE_CHECKING:
    from server.ingest import IngestConfig


class IngestSetupError(Exception):
    """NATS is unreachable, or what exists there does not fit the ingest request."""


@dataclass(frozen=True)
class Topology:
    """Where the ingester reads from and writes dead letters to."""

    stream: str
    dead_letter_subject: str
    dead_letter_stream: str


def default_stream_name(subject: str) -> str:
    """A stream name derived from a subject (stream names allow no ``.``, ``*`` or ``>``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", subject).upper()


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether NATS would deliver ``subject`` to a subscription on ``pattern``."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def dead_letter_subject(subject: str, dead_letter: str | None) -> str:
    """The dead-letter subject: given, or ``<subject>.dlq``.

    Raises:
        IngestSetupError: a wildcard subject without ``--dead-letter``, or a dead-letter
            subject the consumer itself would read (each dead letter would come back).
    """
    if dead_letter is None:
        if "*" in subject.split(".") or ">" in subject.split("."):
            raise IngestSetupError(f"subject {subject!r} has wildcards; give --dead-letter SUBJECT")
        dead_letter = f"{subject}.dlq"
    if subject_matches(subject, dead_letter):
        raise IngestSetupError(f"dead-letter subject {dead_letter!r} is inside the consumed subject {subject!r}")
    return dead_letter


async def ensure_topology(js: JetStreamContext, config: IngestConfig) -> Topology:
    """Create the stream, the dead-letter stream and the durable consumer if missing.

    What exists already is used as it is (an operator may have tuned retention or
    replicas), provided it fits: the stream holds the subject and the consumer filters it.

    Raises:
        IngestSetupError: an existing stream or consumer does not fit, or JetStream refused.
    """
    dlq = dead_letter_subject(config.subject, config.dead_letter)
    try:
        stream = await _ensure_stream(js, config.stream, config.subject)
        # Dead letters must be stored, not just published: a core NATS message with no
        # subscriber is dropped, which is exactly what a dead-letter subject must not do.
        dlq_stream = await _ensure_stream(js, None, dlq, name_if_new=f"{stream}_DLQ")
        await _ensure_consumer(js, stream, config)
    except APIError as exc:
        raise IngestSetupError(f"JetStream refused the ingest setup: {exc.description or exc}") from None
    return Topology(stream, dlq, dlq_stream)


async def _ensure_stream(js: JetStreamContext, name: str | None, subject: str, *, name_if_new: str = "") -> str:
    if name is None:
        try:
            found: str = await js.find_stream_name_by_subject(subject)
            return found
        except NotFoundError:
            name = name_if_new or default_stream_name(subject)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(StreamConfig(name=name, subjects=[subject]))
        return name
    subjects = info.config.subjects or []
    if not any(subject_matches(pattern, subject) for pattern in subjects):
        raise IngestSetupError(f"stream {name!r} holds {subjects}, not {subject!r}")
    return name


async def _ensure_consumer(js: JetStreamContext, stream: str, config: IngestConfig) -> None:
    try:
        info = await js.consumer_info(stream, config.durable)
    except NotFoundError:
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=config.durable,
                filter_subject=config.subject,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=config.ack_wait_s,
                # Unlimited on the server: when JetStream gives up on a message it only
                # emits an advisory, i.e. drops it silently. The ingester bounds retries
                # itself (num_delivered) and dead-letters instead.
                max_deliver=-1,
            ),
        )
        return
    if info.config.ack_policy != AckPolicy.EXPLICIT or (info.config.filter_subject or "") != config.subject:
        raise IngestSetupError(
            f"consumer {config.durable!r} on stream {stream!r} exists with filter "
            f"{info.config.filter_subject!r} and ack policy {info.config.ack_policy}; "
            f"ingest needs filter {config.subject!r} with explicit acks (use another --durable)"
        )
