"""Broker feedback messages: JSON payloads in, ``LabelRequest`` out; dead letters back out."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from domain.ids import prediction_id_for
from domain.ledger import LabelRequest

INVALID_ARGUMENT = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class Rejection:
    """Why a message cannot become a label request at all (always ``INVALID_ARGUMENT``)."""

    reason: str
    code: str = INVALID_ARGUMENT


def decode_feedback(payload: bytes, *, actor: str, default_time: datetime) -> LabelRequest | Rejection:
    """Decode one message: ``{"prediction_id", "label", "event_time"?, "source"?}``.

    Only the message's shape is checked here; whether the label fits the model, the
    prediction exists or was labeled differently is the ledger's call (``prepare_labels``).
    Unknown fields are ignored, as protobuf ignores them on the gRPC path, so producers
    can add tracing fields without their labels being dead-lettered.

    Args:
        payload: the message body.
        actor: who the label events name as their author (e.g. ``nats:<subject>``).
        default_time: the event time when the message carries none (the broker's
            timestamp: when the label was published, not when this process got to it).

    Returns:
        The label request, or a ``Rejection`` with a one-line reason.
    """
    try:
        # orjson is strict JSON: NaN/Infinity literals and overflowing numbers are errors.
        item: Any = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return Rejection(f"not valid JSON: {exc}")
    if not isinstance(item, dict):
        return Rejection('expected a JSON object {"prediction_id": ..., "label": ...}')
    key = item.get("prediction_id")
    if not isinstance(key, str) or not key:
        return Rejection("prediction_id must be a non-empty string")
    label = item.get("label")
    if not isinstance(label, (int, float)) or isinstance(label, bool):
        return Rejection("label must be a number")
    if not math.isfinite(float(label)):
        return Rejection("label must be a finite number")
    source = item.get("source", "")
    if not isinstance(source, str):
        return Rejection("source must be a string")
    event_time = default_time
    if item.get("event_time") is not None:
        parsed = parse_rfc3339(item["event_time"])
        if isinstance(parsed, Rejection):
            return parsed
        event_time = parsed
    return LabelRequest(prediction_id_for(key), float(label), source, event_time, actor)


def parse_rfc3339(value: Any) -> datetime | Rejection:
    """An RFC 3339 time with an explicit offset (``Z`` or ``+hh:mm``)."""
    if not isinstance(value, str):
        return Rejection("event_time must be an RFC 3339 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return Rejection(f"event_time is not an RFC 3339 time: {value!r}")
    if parsed.tzinfo is None:
        # A naive time would be read in this machine's zone: ambiguous, so refused.
        return Rejection(f"event_time needs a timezone offset (Z or +hh:mm): {value!r}")
    return parsed


def dead_letter_body(
    payload: bytes, *, reason: str, code: str, subject: str, stream_seq: int, num_delivered: int
) -> bytes:
    """The dead-letter message: the original payload with the reason and a gRPC-style code.

    A payload that is not UTF-8 is carried base64-encoded (``payload_b64``) so that the
    dead letter is always valid JSON and the original bytes can be recovered exactly.
    """
    body: dict[str, Any] = {
        "code": code,
        "reason": reason,
        "subject": subject,
        "stream_seq": stream_seq,
        "num_delivered": num_delivered,
    }
    try:
        body["payload"] = payload.decode("utf-8")
    except UnicodeDecodeError:
        body["payload_b64"] = base64.b64encode(payload).decode("ascii")
    return orjson.dumps(body)
