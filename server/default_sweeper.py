"""Record default labels for predictions whose feedback window closed in silence.

Runs inside ``learnledger learn``, for the models that process leads: the leader of a
model is the one process that must see its defaults promptly, and limiting each
sweeper to its own models means two learn processes never race for the same rows
(a real label racing in is still possible; that is a ``ConcurrencyError``: prepare again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from uuid import UUID

from domain.errors import ConcurrencyError
from domain.ledger import Ledger

log = logging.getLogger(__name__)

ATTEMPTS = 5


class DefaultSweeper:
    """Sweeps from a cursor; the cursor restarts whenever the set of led models changes."""

    def __init__(self, ledger: Ledger, led_models: Callable[[], frozenset[UUID]]):
        self.ledger = ledger
        self.led_models = led_models
        self.cursor = 0
        self.recorded = 0
        self._models: frozenset[UUID] = frozenset()

    def sweep(self, now: datetime | None = None) -> int:
        """Record every due default label of the led models; returns how many."""
        models = self.led_models()
        if models != self._models:
            # Newly led models may have expired predictions behind the cursor (their
            # previous leader died before sweeping them): start over.
            self._models, self.cursor = models, 0
        if not models:
            return 0
        total = 0
        while True:
            count, moved = self._sweep_page(models, now or datetime.now(UTC))
            total += count
            if not moved:
                break
        self.recorded += total
        return total

    def _sweep_page(self, models: frozenset[UUID], now: datetime) -> tuple[int, bool]:
        for _ in range(ATTEMPTS):
            events, cursor = self.ledger.prepare_default_labels(now=now, after=self.cursor)
            mine = [e for e in events if e.model_id in models]
            try:
                self.ledger.record(mine)
            except ConcurrencyError:
                continue  # a real label came first for one of them: prepare again
            moved = cursor > self.cursor
            self.cursor = cursor
            return len(mine), moved
        log.warning("default labels kept conflicting with arriving labels; will retry")
        return 0, False
