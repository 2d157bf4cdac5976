"""Decoding broker feedback messages, dead-letter bodies and subject rules (no broker needed)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from domain.ids import prediction_id_for
from domain.ledger import LabelRequest
from server.feedback_messages import Rejection, dead_letter_body, decode_feedback
from server.nats_topology import IngestSetupError, dead_letter_subject, default_stream_name, subject_matches

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def _decode(payload: bytes) -> LabelRequest | Rejection:
    return decode_feedback(payload, actor="nats:s", default_time=NOW)


def test_a_complete_message_becomes_a_label_request() -> None:
    payload = b'{"prediction_id": "order-1", "label": 1, "event_time": "2025-01-02T03:04:05.5+02:00", "source": "crm"}'
    assert _decode(payload) == LabelRequest(
        prediction_id_for("order-1"),
        1.0,
        "crm",
        datetime(2025, 1, 2, 3, 4, 5, 500000, tzinfo=timezone(timedelta(hours=2))),
        "nats:s",
    )


def test_optional_fields_default_to_the_broker_time_and_no_source() -> None:
    request = _decode(b'{"prediction_id": "order-1", "label": 0.5, "trace": "ignored"}')
    assert isinstance(request, LabelRequest)
    assert (request.event_time, request.source, request.label) == (NOW, "", 0.5)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{nope", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"label": 1}', "prediction_id"),
        (b'{"prediction_id": "", "label": 1}', "prediction_id"),
        (b'{"prediction_id": 7, "label": 1}', "prediction_id"),
        (b'{"prediction_id": "a"}', "label must be a number"),
        (b'{"prediction_id": "a", "label": "1"}', "label must be a number"),
        (b'{"prediction_id": "a", "label": true}', "label must be a number"),
        (b'{"prediction_id": "a", "label": NaN}', "not valid JSON"),
        (b'{"prediction_id": "a", "label": 1e999}', "not valid JSON"),
        (b'{"prediction_id": "a", "label": 1, "source": 3}', "source"),
        (b'{"prediction_id": "a", "label": 1, "event_time": "soon"}', "RFC 3339"),
        (b'{"prediction_id": "a", "label": 1, "event_time": 1700000000}', "RFC 3339"),
        (b'{"prediction_id": "a", "label": 1, "event_time": "2025-01-01T00:00:00"}', "timezone"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    rejection = _decode(payload)
    assert isinstance(rejection, Rejection) and rejection.code == "INVALID_ARGUMENT"
    assert reason in rejection.reason


def test_dead_letters_keep_the_original_bytes() -> None:
    text = orjson.loads(dead_letter_body(b'{"a": 1}', reason="r", code="C", subject="s", stream_seq=4, num_delivered=2))
    assert text == {
        "code": "C",
        "reason": "r",
        "subject": "s",
        "stream_seq": 4,
        "num_delivered": 2,
        "payload": '{"a": 1}',
    }
    binary = orjson.loads(
        dead_letter_body(b"\xff\x00", reason="r", code="C", subject="s", stream_seq=1, num_delivered=1)
    )
    assert base64.b64decode(binary["payload_b64"]) == b"\xff\x00" and "payload" not in binary


def test_subject_rules() -> None:
    assert subject_matches("a.*.c", "a.b.c") and not subject_matches("a.*", "a.b.c")
    assert subject_matches("a.>", "a.b.c") and not subject_matches("a.>", "a")
    assert not subject_matches("a.b", "a.b.dlq")
    assert dead_letter_subject("feedback.labels", None) == "feedback.labels.dlq"
    assert dead_letter_subject("feedback.*", "dead.feedback") == "dead.feedback"
    with pytest.raises(IngestSetupError, match="wildcards"):
        dead_letter_subject("feedback.>", None)
    with pytest.raises(IngestSetupError, match="inside"):
        dead_letter_subject("feedback.>", "feedback.dlq")
    assert default_stream_name("feedback.labels.*") == "FEEDBACK_LABELS__"
