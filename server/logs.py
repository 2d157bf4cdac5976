"""Structured logs: one JSON object per line, with the request id of the RPC being served."""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The id of the RPC running in this context; set by the metrics interceptor around each
# call, so any log line written while serving it can carry it without being passed down.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("learnledger_request_id", default=None)

# Everything a bare LogRecord has: whatever else is in its __dict__ came from ``extra``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def current_request_id() -> str | None:
    """The request id of the RPC this thread is serving, if any."""
    return request_id.get()


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON: ``time``, ``level``, ``logger``, ``message``, then extras.

    Extras are the record's ``extra={...}`` fields (``request_id``, ``prediction_id``,
    ``model``, ``rpc``, …); ``request_id`` defaults to the current RPC's. Values orjson
    cannot encode natively are written as ``str(value)``; an exception becomes
    ``exception`` (the formatted traceback).
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON object, without a trailing newline."""
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                payload[key] = value
        if "request_id" not in payload:
            rid = request_id.get()
            if rid is not None:
                payload["request_id"] = rid
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(payload, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def configure_logging(log_format: str, level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Send the root logger's records to ``stream`` (stderr) as text or JSON lines.

    Replaces the root logger's handlers, so a later ``logging.basicConfig`` (the
    commands' own default) is a no-op.

    Args:
        log_format: ``text`` or ``json``.
        level: the root logger's level.
        stream: where to write (default ``sys.stderr``).

    Raises:
        ValueError: an unknown format.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
