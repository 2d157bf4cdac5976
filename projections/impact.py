"""Taint analysis: which model versions descend from some labels, and what those versions served.

A version is *tainted* when its parameters depend on a labeled example in question.
Folding a model's events in version order:

* ``UpdateApplied`` at v: tainted(v) = tainted(v - 1) or its batch holds one of the ids;
* ``RolledBack`` to T at v: tainted(v) = tainted(T) — the state *is* T's again, so a
  rollback to a version before the first tainted update clears the taint, and a
  rollback to a tainted version keeps it;
* anything else (rejected update, pause, resume): tainted(v) = tainted(v - 1), since the
  state did not change. A rejected batch holding an id is listed, but taints nothing.

Every prediction served by a tainted version is affected (count, first and last time,
ids). Pure over the log; nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

from domain.ledger import Ledger
from domain.model import Model
from projections.audit_log import served_predictions

SAMPLE = 10
MAX_IDS = 10_000
SCHEMA = "learnledger.impact/1"


@dataclass(frozen=True)
class TaintedUpdate:
    """An applied update whose batch held examples in question."""

    version: int
    examples: int
    batch_size: int
    time: str


@dataclass
class ModelImpact:
    """The tainted versions of one model and the predictions they served."""

    model: str
    model_id: str
    examples_learned: int
    tainted_updates: list[TaintedUpdate]
    rejected_updates: list[int]
    tainted_versions: list[int]
    tainted_ranges: list[tuple[int, int]]
    cleared_by_rollbacks: list[int]
    head_tainted: bool
    predictions: int = 0
    first_prediction: str | None = None
    last_prediction: str | None = None
    sample_ids: list[str] = field(default_factory=list)
    prediction_ids: list[str] = field(default_factory=list)
    ids_truncated: bool = False


def tainted_versions(events: Sequence[Any], ids: frozenset[UUID]) -> dict[int, bool]:
    """Version → whether its state descends from any of ``ids`` (the rule in the module docstring)."""
    taint: dict[int, bool] = {}
    current = False
    for event in events:
        version = event.originator_version
        if isinstance(event, Model.UpdateApplied):
            current = current or any(pid in ids for pid in event.prediction_ids)
        elif isinstance(event, Model.RolledBack):
            current = taint[event.to_version]
        taint[version] = current
    return taint


def model_impact(ledger: Ledger, model: Model, ids: frozenset[UUID], *, max_ids: int = MAX_IDS) -> ModelImpact:
    """The impact of ``ids`` on one model: tainted versions and the predictions they served."""
    events = ledger.get_model_events(model.id)
    taint = tainted_versions(events, ids)
    updates: list[TaintedUpdate] = []
    rejected: list[int] = []
    cleared: list[int] = []
    learned: set[UUID] = set()
    for event in events:
        v = event.originator_version
        if isinstance(event, Model.UpdateApplied):
            hit = [pid for pid in event.prediction_ids if pid in ids]
            if hit:
                learned.update(hit)
                updates.append(TaintedUpdate(v, len(hit), len(event.prediction_ids), event.timestamp.isoformat()))
        elif isinstance(event, Model.UpdateRejected) and any(pid in ids for pid in event.prediction_ids):
            rejected.append(v)
        elif isinstance(event, Model.RolledBack) and taint.get(v - 1) and not taint[v]:
            cleared.append(v)
    versions = sorted(v for v, t in taint.items() if t)
    impact = ModelImpact(
        model=model.name,
        model_id=str(model.id),
        examples_learned=len(learned),
        tainted_updates=updates,
        rejected_updates=rejected,
        tainted_versions=versions,
        tainted_ranges=_ranges(versions),
        cleared_by_rollbacks=cleared,
        head_tainted=bool(events) and taint[events[-1].originator_version],
    )
    if not versions:
        return impact
    wanted = set(versions)
    for row in served_predictions(ledger, model.id):
        if row.version not in wanted:
            continue
        impact.predictions += 1
        when = row.time.isoformat()
        impact.first_prediction = impact.first_prediction or when
        impact.last_prediction = when
        if len(impact.sample_ids) < SAMPLE:
            impact.sample_ids.append(str(row.prediction_id))
        if len(impact.prediction_ids) < max_ids:
            impact.prediction_ids.append(str(row.prediction_id))
        else:
            impact.ids_truncated = True
    return impact


def impact_report(
    ledger: Ledger, ids: frozenset[UUID], rule: str, models: Sequence[Model], *, max_ids: int = MAX_IDS
) -> dict[str, Any]:
    """The JSON-ready impact of ``ids`` on every model in ``models``."""
    found = [model_impact(ledger, m, ids, max_ids=max_ids) for m in models]
    return {
        "schema": SCHEMA,
        "rule": rule,
        "examples": len(ids),
        "rule_text": (
            "a version is tainted when its state descends from an update whose batch held one of the examples; "
            "a rollback makes a version exactly as tainted as its target"
        ),
        "log_position": int(ledger.recorder.max_notification_id() or 0),
        "models": [asdict(m) for m in found],
        "tainted_versions": sum(len(m.tainted_versions) for m in found),
        "affected_predictions": sum(m.predictions for m in found),
    }


def _ranges(versions: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for v in versions:
        if runs and runs[-1][1] == v - 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return [(a, b) for a, b in runs]
