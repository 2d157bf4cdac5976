"""Reading the log for audits: a model's served predictions and the labels that came back.

One ordered pass over the notification log (topics filtered in SQL, pages of ``PAGE``),
so every audit query answers from the log itself, never from a cache. Label semantics
follow the ``Prediction`` aggregate: the first label counts; a real label arriving after
a default label is recorded but was never learned from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.ledger import Ledger
from domain.prediction import DEFAULT_LABELED_TOPIC, LABELED_TOPIC, MADE_TOPIC, Prediction

PAGE = 1000
DEFAULT_SOURCE = "default"  # the source name the Prediction aggregate gives a default label


@dataclass(frozen=True)
class Served:
    """One logged prediction: which version served it, when, with what result."""

    prediction_id: UUID
    model_id: UUID
    version: int
    time: datetime
    features: tuple[float, ...]
    score: float
    decision: float


@dataclass(frozen=True)
class Feedback:
    """The label that counts for one prediction (the first one recorded)."""

    prediction_id: UUID
    model_id: UUID
    label: float
    source: str
    in_window: bool


def iter_events(ledger: Ledger, topics: Sequence[str], *, upto: int | None = None) -> Iterator[Any]:
    """Decoded events of ``topics`` in log order, up to position ``upto`` (default: the end)."""
    end = int(ledger.recorder.max_notification_id() or 0)
    stop = end if upto is None else min(upto, end)
    start = 1
    while start <= stop:
        page = ledger.recorder.select_notifications(start, PAGE, stop=stop, topics=list(topics))
        for notification in page:
            yield ledger.mapper.to_domain_event(notification)
        if len(page) < PAGE:
            return
        start = page[-1].id + 1


def served_predictions(
    ledger: Ledger,
    model_id: UUID,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    upto: int | None = None,
) -> list[Served]:
    """Every prediction the model served (within ``since``..``until`` inclusive), in log order."""
    out: list[Served] = []
    for event in iter_events(ledger, [MADE_TOPIC], upto=upto):
        if event.model_id != model_id:
            continue
        if (since is not None and event.timestamp < since) or (until is not None and event.timestamp > until):
            continue
        out.append(
            Served(
                event.originator_id,
                event.model_id,
                event.model_version,
                event.timestamp,
                tuple(event.features),
                event.score,
                event.decision,
            )
        )
    return out


def feedback(ledger: Ledger, model_id: UUID | None = None, *, upto: int | None = None) -> dict[UUID, Feedback]:
    """The label that counts for every labeled prediction (of one model, or of all).

    Returns:
        Prediction id → its first label; a default label has source ``"default"``.
    """
    out: dict[UUID, Feedback] = {}
    for event in iter_events(ledger, [LABELED_TOPIC, DEFAULT_LABELED_TOPIC], upto=upto):
        if model_id is not None and event.model_id != model_id:
            continue
        pid = event.originator_id
        if pid in out:
            continue  # a late real label after a default: recorded, never learned from
        if isinstance(event, Prediction.DefaultLabeled):
            out[pid] = Feedback(pid, event.model_id, event.label, DEFAULT_SOURCE, True)
        else:
            out[pid] = Feedback(pid, event.model_id, event.label, event.source, event.in_window)
    return out


def ids_from_source(labels: dict[UUID, Feedback], source: str) -> frozenset[UUID]:
    """The predictions whose counting label came from ``source``."""
    return frozenset(pid for pid, f in labels.items() if f.source == source)


def sources_of(labels: dict[UUID, Feedback]) -> list[str]:
    """Every label source seen, sorted (for error messages)."""
    return sorted({f.source for f in labels.values()})
