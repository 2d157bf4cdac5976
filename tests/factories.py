"""Test data builders shared by the suites: predictions as the serving path records them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from domain.ids import new_prediction_id
from domain.prediction import Prediction, make_prediction_event


def prediction_events(
    model: Any,
    n: int,
    *,
    when: datetime | None = None,
    features: Callable[[int], Sequence[float]] = lambda i: (float(i), 1.0),
    score: float = 0.5,
    decision: float = 1.0,
) -> list[Prediction.Made]:
    """``n`` ``Prediction.Made`` events served by ``model``'s head (not recorded)."""
    now = when or datetime.now(UTC)
    return [
        make_prediction_event(
            new_prediction_id(),
            model_id=model.id,
            model_name=model.name,
            model_version=model.version,
            spec=model.spec,
            features=features(i),
            score=score,
            decision=decision,
            params_digest=model.digest,
            routing="champion",
            actor="t",
            timestamp=now,
        )
        for i in range(n)
    ]
