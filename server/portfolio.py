"""Staged enablement: let online learning run for a fraction of the portfolio at a time.

``learnledger stage --fraction F`` orders the models by the sha256 of their name (stable:
it does not depend on registration order, on which models exist besides, or on the
machine) and makes exactly the first ``ceil(F * n)`` of them learn and the rest pause —
by recording ``Model.Resumed`` / ``Model.Paused`` events whose reason names the stage,
so who switched what on, when and why is in the log like any other decision. Running
it twice changes nothing the second time; raising F only adds models at the end of the
order, so a stage never pauses a model an earlier, smaller stage let learn.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from domain.errors import FailedPreconditionError
from server.services import LedgerService

STAGE_ACTOR = "stage"


def stage_key(name: str) -> str:
    """A model's place in the staging order: the sha256 of its name, hex."""
    return hashlib.sha256(name.encode()).hexdigest()


def stage_count(fraction: float, n: int) -> int:
    """How many of ``n`` models learn at ``fraction``: ``ceil(fraction * n)``, exactly.

    The fraction is taken as the decimal it was written as (0.1 is one tenth), so that
    float rounding never adds a model: ``ceil(0.1 * 30)`` in floats is 4, not 3.

    >>> stage_count(0.1, 30), stage_count(0.25, 100), stage_count(0.01, 3), stage_count(0.0, 5)
    (3, 25, 1, 0)
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the fraction must be from 0 to 1, got {fraction}")
    return math.ceil(Fraction(str(fraction)) * n)


@dataclass
class StageResult:
    """What a stage did: the models it resumed and paused, and the ones left as they were."""

    fraction: float
    selected: int
    learning: list[str] = field(default_factory=list)  # in staging order
    resumed: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    unchanged: int = 0

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` payload."""
        return {
            "fraction": self.fraction,
            "models": self.selected,
            "learning": self.learning,
            "resumed": self.resumed,
            "paused": self.paused,
            "unchanged": self.unchanged,
        }


def stage(service: LedgerService, fraction: float, *, pattern: str = "*", note: str = "", actor: str) -> StageResult:
    """Pause and resume models so that exactly the first ``ceil(fraction * n)`` learn.

    Args:
        service: the ledger's services (pause/resume record the events).
        fraction: the share of the selected models that learns, from 0 to 1.
        pattern: fnmatch pattern on model names; only those are staged (n counts them).
        note: appended to the recorded reason.
        actor: who staged (recorded).

    Returns:
        What changed. Models already in the wanted state get no event.
    """
    models = [m for m in service.ledger.list_models() if fnmatch.fnmatchcase(m.name, pattern)]
    models.sort(key=lambda m: stage_key(m.name))
    k = stage_count(fraction, len(models))
    reason = f"stage {Fraction(str(fraction))} ({k} of {len(models)} models matching {pattern!r} learn)"
    if note.strip():
        reason += f": {note.strip()}"
    result = StageResult(fraction, len(models), learning=[m.name for m in models[:k]])
    for i, model in enumerate(models):
        learn = i < k
        if model.paused != learn:
            result.unchanged += 1
            continue
        change = service.resume if learn else service.pause
        try:
            change(model.name, reason, actor)
        except FailedPreconditionError:
            # Someone else paused/resumed it since it was listed: it is as wanted now.
            result.unchanged += 1
            continue
        (result.resumed if learn else result.paused).append(model.name)
    return result


def cmd_stage(args: argparse.Namespace) -> int:
    """``learnledger stage --fraction F [--models PATTERN] [--reason TEXT] [--json]``."""
    from server.bootstrap import runtime
    from server.cli import emit

    with runtime() as rt:
        result = stage(rt.service, args.fraction, pattern=args.models or "*", note=args.reason, actor=STAGE_ACTOR)
    lines = [f"resumed {name}" for name in result.resumed] + [f"paused {name}" for name in result.paused]
    lines.append(
        f"stage {args.fraction:g}: {len(result.learning)} of {result.selected} models learn "
        f"({len(result.resumed)} resumed, {len(result.paused)} paused, {result.unchanged} unchanged)"
    )
    emit(args, result.to_json(), "\n".join(lines))
    return 0
