"""What a ``learn`` process's reader handed one model since its last commit, kept for a reload.

A model that fails, is paused or has a commit refused reloads its learner from the log;
the labels it had not learned yet then come from its journal instead of making the
process's one log reader rewind (which re-reads and re-decodes the log for every model
the process leads). ``server.model_worker`` keeps one per led model.
"""

from __future__ import annotations

from collections import deque
from typing import Any
from uuid import UUID


class Journal:
    """The log's events for one model in ``(base, position]``, as the reader handed them over.

    A slot appends whatever it accepts and forgets up to each committed batch's last
    label, so after a failure (or an operator's pause, a refused commit) the reload
    resumes from here instead of rewinding the process's one log reader. Bounded by
    ``limit``: past it the oldest events go and ``base`` moves up with them.
    """

    def __init__(self, limit: int):
        self.limit = limit
        # None: holds nothing yet (the model was never loaded); a reload must rewind.
        self.base: int | None = None
        self._items: deque[tuple[int, Any]] = deque()
        self._through: UUID | None = None

    def __len__(self) -> int:
        return len(self._items)

    def reset(self, base: int) -> None:
        """Hold nothing, and cover the log from after ``base`` on."""
        self.base, self._through = base, None
        self._items.clear()

    def extend(self, items: list[tuple[int, Any]]) -> None:
        """Append events handed over after the last ones (in log order)."""
        self._items.extend(items)
        while len(self._items) > self.limit:
            self.base = self._items.popleft()[0]

    def resume_from(self, position: int) -> list[tuple[int, Any]] | None:
        """The events after ``position``, forgetting the rest; None if some are not here."""
        if self.base is None or position < self.base:
            return None
        while self._items and self._items[0][0] <= position:
            self._items.popleft()
        self.base = position
        return list(self._items)

    def trim_through(self, prediction_id: UUID | None) -> None:
        """Forget up to the label of ``prediction_id``, a committed batch's last one: a
        reload resumes after it (only a rollback resumes earlier, and then rewinds)."""
        if prediction_id is None or prediction_id == self._through:
            return  # e.g. a rollout decision: nothing new was learned
        # Labels are learned in log order, so the scan stops within this commit's batch.
        for index, (position, event) in enumerate(self._items):
            if event.originator_id == prediction_id and event.originator_version == 2:  # its label (or default)
                for _ in range(index + 1):
                    self._items.popleft()
                self.base, self._through = position, prediction_id
                return
