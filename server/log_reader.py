"""Reads of the notification log the server needs at start-up: labels not yet learned."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import UUID

from domain.ledger import Ledger
from domain.prediction import LABELED_TOPIC, Prediction

PAGE = 1000  # pages >= 500: the library's default section size of 10 is 5x slower


def labeled_position(ledger: Ledger, prediction_id: UUID) -> int | None:
    """The notification id of a prediction's ``Labeled`` event (its version 2), if any."""
    recorder: Any = ledger.recorder
    position: int | None = recorder.select_notification_id(prediction_id, 2)
    return position


def labels_after(ledger: Ledger, position: int) -> Iterator[tuple[int, Prediction.Labeled]]:
    """Every ``Prediction.Labeled`` after ``position`` in commit order, with its position."""
    start = position + 1
    while True:
        page = ledger.recorder.select_notifications(start, PAGE, topics=[LABELED_TOPIC])
        for notification in page:
            event: Any = ledger.mapper.to_domain_event(notification)
            yield notification.id, event
        if len(page) < PAGE:
            return
        start = page[-1].id + 1
