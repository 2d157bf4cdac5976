"""A model's prequential accuracy over its versions, from the logged predictions and labels.

Every logged prediction was served before its label existed, so scoring each served
decision against the label that came back later is test-then-train evaluation
(prequential; Dawid 1984, Gama et al. 2013) of exactly what the service did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import numpy as np

from domain.ledger import Ledger
from domain.prediction import DEFAULT_LABELED_TOPIC, LABELED_TOPIC, MADE_TOPIC, Prediction
from domain.spec import LearnerSpec

PAGE = 1000
MAX_POINTS = 50


@dataclass(frozen=True)
class PerformancePoint:
    """Served decisions of versions ``first_version``..``last_version`` that got a label."""

    first_version: int
    last_version: int
    labeled: int
    value: float


@dataclass(frozen=True)
class PerformanceSeries:
    """Accuracy (classification) or mean absolute error (regression) over versions."""

    metric: str
    points: tuple[PerformancePoint, ...]
    labeled: int
    overall: float | None
    log_position: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {
            "metric": self.metric,
            "labeled": self.labeled,
            "overall": self.overall,
            "log_position": self.log_position,
            "points": [
                {
                    "first_version": p.first_version,
                    "last_version": p.last_version,
                    "labeled": p.labeled,
                    "value": p.value,
                }
                for p in self.points
            ],
        }


def performance_by_version(
    ledger: Ledger, model_id: UUID, spec: LearnerSpec, *, upto: int | None = None, max_points: int = MAX_POINTS
) -> PerformanceSeries:
    """Prequential performance per model version, binned into at most ``max_points`` points.

    One pass over the notification log (pages of ``PAGE``, topics filtered in SQL). A
    real label counts; a default label counts as the outcome it declares; a real label
    arriving after a default does not replace it (the learner never saw it either).

    Args:
        ledger: the ledger to read.
        model_id: the model.
        spec: its spec (selects accuracy or mean absolute error).
        upto: last log position to read (default: the current end of the log).
        max_points: most points returned; consecutive versions are merged into bins of
            roughly equal numbers of labeled predictions.
    """
    end = ledger.recorder.max_notification_id() or 0
    stop = end if upto is None else min(upto, end)
    served: dict[UUID, tuple[int, float]] = {}
    per_version: dict[int, list[float]] = {}
    regression = spec.head == "regression"
    start = 1
    while start <= stop:
        page = ledger.recorder.select_notifications(
            start, PAGE, stop=stop, topics=[MADE_TOPIC, LABELED_TOPIC, DEFAULT_LABELED_TOPIC]
        )
        for notification in page:
            event: Any = ledger.mapper.to_domain_event(notification)
            if event.model_id != model_id:
                continue
            pid = event.originator_id
            if isinstance(event, Prediction.Made):
                served[pid] = (event.model_version, event.decision)
                continue
            found = served.pop(pid, None)  # first label only
            if found is None:
                continue
            version, decision = found
            error = abs(decision - event.label) if regression else float(decision == event.label)
            per_version.setdefault(version, []).append(error)
        if len(page) < PAGE:
            break
        start = page[-1].id + 1
    points = _bin(per_version, max_points)
    total = sum(len(v) for v in per_version.values())
    overall = float(np.mean([e for v in per_version.values() for e in v])) if total else None
    metric = "mean absolute error" if regression else "accuracy"
    return PerformanceSeries(metric, tuple(points), total, overall, stop)


def _bin(per_version: dict[int, list[float]], max_points: int) -> list[PerformancePoint]:
    versions = sorted(per_version)
    total = sum(len(per_version[v]) for v in versions)
    if not total:
        return []
    target = max(1, -(-total // max_points))  # labeled predictions per bin, rounded up
    points: list[PerformancePoint] = []
    bucket: list[float] = []
    first = versions[0]
    for version in versions:
        if not bucket:
            first = version
        bucket.extend(per_version[version])
        if len(bucket) >= target:
            points.append(PerformancePoint(first, version, len(bucket), float(np.mean(bucket))))
            bucket = []
    if bucket and len(points) >= max_points:
        # A short tail joins the last bin rather than exceed max_points.
        last = points.pop()
        n = last.labeled + len(bucket)
        mean = (last.value * last.labeled + float(np.sum(bucket))) / n
        points.append(PerformancePoint(last.first_version, versions[-1], n, mean))
    elif bucket:
        points.append(PerformancePoint(first, versions[-1], len(bucket), float(np.mean(bucket))))
    return points
