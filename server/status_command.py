"""``learnledger status [--json]``: one line per model — state, freshness lag, loss, drift, rollout."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import UTC, datetime

from projections.status import ModelStatus, list_status
from server.bootstrap import runtime
from server.cli import emit

COLUMNS = (
    "MODEL",
    "STATE",
    "VERSION",
    "SERVING",
    "LAG",
    "OLDEST",
    "LOSS",
    "DRIFT",
    "ROLLOUT",
    "ACCEPTED",
    "REJECTED",
    "ROLLBACKS",
)
# Left-aligned text columns; the rest are numbers and align right.
TEXT_COLUMNS = frozenset({"MODEL", "STATE", "DRIFT", "ROLLOUT"})


def cmd_status(args: argparse.Namespace) -> int:
    """``learnledger status [--json]``: the portfolio table, or ``{"models": [...]}``."""
    with runtime() as rt:
        rows = list_status(rt.ledger, now=datetime.now(UTC))
    emit(args, {"models": [r.to_json() for r in rows]}, status_table(rows))
    return 0


def status_table(rows: Sequence[ModelStatus]) -> str:
    """The rows as an aligned plain-text table (``no models`` when there are none)."""
    if not rows:
        return "no models"
    cells = [COLUMNS, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = []
    for line in cells:
        parts = [
            value.ljust(width) if name in TEXT_COLUMNS else value.rjust(width)
            for name, value, width in zip(COLUMNS, line, widths, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    paused = [r for r in rows if r.paused and r.pause_reason]
    lines.extend(f"{r.name}: paused — {r.pause_reason}" for r in paused)
    return "\n".join(lines)


def _cells(r: ModelStatus) -> tuple[str, ...]:
    drift = f"{r.drift_detections} ({r.last_drift_detector}@v{r.last_drift_version})" if r.drift_detections else "0"
    rollout = (
        f"v{r.rollout['candidate_version']} stage {r.rollout['stage']} {r.rollout['fraction']:.0%}"
        if r.rollout
        else "-"
    )
    return (
        r.name,
        r.state,
        str(r.version),
        str(r.serving_version),
        str(r.lag_labels),
        format_age(r.lag_oldest_s),
        f"{r.recent_loss:.4f}" if r.recent_loss is not None else "-",
        drift,
        rollout,
        str(r.updates_applied),
        str(r.updates_rejected),
        str(r.rollbacks),
    )


def format_age(seconds: float | None) -> str:
    """A lag age for people: ``-``, ``42s``, ``7m``, ``3h`` or ``2d``."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
