"""One model's operational history: the timeline of gate, drift, rollback, pause and rollout
facts, and the loss curve of its accepted updates (the operator dashboard's model page).

Both are plain reads of the model's own events; nothing is replayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.model import Model

TIMELINE_KINDS = ("gate", "drift", "rollback", "pause", "resume", "rebaseline", "rollout", "registered")


@dataclass(frozen=True)
class TimelineItem:
    """One operational fact of a model: anything but an accepted update.

    ``prediction_id`` names the decision a drift detector fired at (to explain it).
    """

    version: int
    time: datetime
    kind: str
    event: str
    actor: str
    detail: str
    figures: tuple[tuple[str, float], ...] = ()
    prediction_id: UUID | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {
            "version": self.version,
            "time": self.time.isoformat(),
            "kind": self.kind,
            "event": self.event,
            "actor": self.actor,
            "detail": self.detail,
            "figures": dict(self.figures),
            "prediction_id": str(self.prediction_id) if self.prediction_id else None,
        }


def model_timeline(events: Sequence[Any]) -> list[TimelineItem]:
    """Gate refusals, drift detections, rollbacks, pauses, rebaselines and rollout steps, in order.

    Accepted updates are left out: they are the loss curve (``loss_series``), and a busy
    model has thousands of them.
    """
    items: list[TimelineItem] = []
    for event in events:
        found = _describe(event)
        if found is None:
            continue
        kind, detail, figures, prediction = found
        items.append(
            TimelineItem(
                version=event.originator_version,
                time=event.timestamp,
                kind=kind,
                event=type(event).__name__,
                actor=str(getattr(event, "actor", "")),
                detail=detail,
                figures=tuple(sorted((str(k), float(v)) for k, v in (figures or {}).items())),
                prediction_id=prediction,
            )
        )
    return items


def _describe(event: Any) -> tuple[str, str, dict[str, float] | None, UUID | None] | None:
    # One dispatch point; unknown (future) model events still show, under their name.
    match event:
        case Model.UpdateApplied():
            return None
        case Model.Registered(actor=actor):
            return "registered", f"registered by {actor}", None, None
        case Model.UpdateRejected(reason=reason, gate=gate, prediction_ids=ids):
            return "gate", f"update on {len(ids)} examples refused: {reason}", gate, None
        case Model.DriftDetected(detector=detector, action=action, figures=figures, at_prediction=at):
            return "drift", f"{detector} detected drift; action: {action}", figures, at
        case Model.RolledBack(to_version=target, reason=reason):
            return "rollback", f"rolled back to version {target}: {reason}", None, None
        case Model.Paused(reason=reason):
            return "pause", f"learning paused: {reason}", None, None
        case Model.Resumed(reason=reason):
            return "resume", f"learning resumed: {reason}", None, None
        case Model.Rebaselined(prediction_ids=ids, epochs=epochs, reason=reason):
            return "rebaseline", f"re-fit on {len(ids)} examples ({epochs} epochs): {reason}", None, None
        case Model.RolloutAdvanced(stage=stage, fraction=fraction, figures=figures):
            return "rollout", f"rollout stage {stage}: the candidate serves {fraction:.0%}", figures, None
        case Model.RolloutAborted(to_version=target, reason=reason, figures=figures):
            return "rollout", f"rollout aborted, version {target}'s state serves again: {reason}", figures, None
        case Model.RolloutCompleted(figures=figures):
            return "rollout", "rollout completed: the candidate serves all traffic", figures, None
    return "other", type(event).__name__, None, None


def loss_series(events: Sequence[Any], max_points: int = 100) -> list[dict[str, Any]]:
    """Mean ``loss_before`` of accepted updates over versions, in at most ``max_points`` bins.

    The same bin shape as ``projections.performance`` (``first_version``,
    ``last_version``, ``labeled`` = updates in the bin, ``value``), so one chart draws both.
    """
    losses = [(e.originator_version, float(e.loss_before)) for e in events if isinstance(e, Model.UpdateApplied)]
    if not losses:
        return []
    size = -(-len(losses) // max_points)  # updates per bin, rounded up
    out = []
    for i in range(0, len(losses), size):
        chunk = losses[i : i + size]
        out.append(
            {
                "first_version": chunk[0][0],
                "last_version": chunk[-1][0],
                "labeled": len(chunk),
                "value": sum(v for _, v in chunk) / len(chunk),
            }
        )
    return out
