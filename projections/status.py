"""The portfolio status: one row per model — state, freshness lag, recent loss, drift, rollout.

Read-side only and answered from the log: the ``Model`` aggregate's own attributes,
the tail of its event stream (recent losses), and one SQL aggregate over the labels
committed after each model's resume position (freshness). Nothing is replayed, so a
status over 100 models costs a handful of queries, not 100 folds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.ledger import Ledger
from domain.model import Model
from domain.prediction import DEFAULT_LABELED_TOPIC, LABELED_TOPIC, Prediction
from projections.store import LedgerRecorder

RECENT_UPDATES = 10
STATES = ("learning", "paused", "rollout")
PAGE = 1000
# Reading a model's stream backwards for its recent updates stops after this many
# events: a model whose last updates lie further back than that shows no recent loss.
MAX_TAIL_EVENTS = 2000


@dataclass(frozen=True)
class LabelBacklog:
    """Committed, learnable labels of one model that no update event has consumed yet."""

    labels: int
    oldest: datetime | None


@dataclass(frozen=True)
class ModelStatus:
    """One model's operational state, as the log records it.

    Attributes:
        state: ``paused`` (learning stopped by an operator or the drift policy; it wins
            over a rollout, which cannot advance while paused), ``rollout`` (a candidate
            serves a share of traffic; learning waits) or ``learning``.
        lag_labels: in-window labels (and default labels) committed after the label of
            the model's ``learned_through`` prediction: what its learner has still to take.
        lag_oldest_s: age in seconds of the oldest of them (None when there are none).
        recent_loss: mean ``loss_before`` of the last ``recent_updates`` accepted updates
            (the loss of the served state on the batches it then learned from).
    """

    name: str
    model_id: UUID
    kind: str
    version: int
    serving_version: int
    state: str
    paused: bool
    pause_reason: str
    lag_labels: int
    lag_oldest_s: float | None
    recent_loss: float | None
    recent_updates: int
    drift_detections: int
    last_drift_detector: str | None
    last_drift_version: int | None
    rollout: dict[str, Any] | None
    updates_applied: int
    updates_rejected: int
    rollbacks: int
    rebaselines: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping (the ``learnledger status --json`` row)."""
        return {
            "name": self.name,
            "model_id": str(self.model_id),
            "kind": self.kind,
            "version": self.version,
            "serving_version": self.serving_version,
            "state": self.state,
            "paused": self.paused,
            "pause_reason": self.pause_reason,
            "lag": {"labels": self.lag_labels, "oldest_s": self.lag_oldest_s},
            "recent_loss": self.recent_loss,
            "recent_updates": self.recent_updates,
            "drift": {
                "detections": self.drift_detections,
                "last_detector": self.last_drift_detector,
                "last_version": self.last_drift_version,
            },
            "rollout": self.rollout,
            "updates_applied": self.updates_applied,
            "updates_rejected": self.updates_rejected,
            "rollbacks": self.rollbacks,
            "rebaselines": self.rebaselines,
        }


def list_status(ledger: Ledger, *, now: datetime, recent: int = RECENT_UPDATES) -> list[ModelStatus]:
    """Every registered model's status, in registration order.

    Args:
        ledger: the ledger to read.
        now: the time lag ages are measured against (aware).
        recent: how many of the latest accepted updates the recent loss averages.
    """
    return status_of(ledger, ledger.list_models(), now=now, recent=recent)


def get_status(ledger: Ledger, name: str, *, now: datetime, recent: int = RECENT_UPDATES) -> ModelStatus:
    """One model's status. Raises ``ModelNotFoundError``."""
    return status_of(ledger, [ledger.get_model(name)], now=now, recent=recent)[0]


def status_of(
    ledger: Ledger, models: Sequence[Model], *, now: datetime, recent: int = RECENT_UPDATES
) -> list[ModelStatus]:
    """The status rows of ``models`` (already loaded), with one backlog query for all."""
    backlog = label_backlog(ledger, {m.id: m.learned_through for m in models})
    rows = []
    for model in models:
        losses = recent_losses(ledger, model.id, recent)
        found = backlog.get(model.id, LabelBacklog(0, None))
        rows.append(
            ModelStatus(
                name=model.name,
                model_id=model.id,
                kind=model.spec.kind,
                version=model.version,
                serving_version=model.serving_version,
                state=learning_state(model),
                paused=model.paused,
                pause_reason=model.pause_reason,
                lag_labels=found.labels,
                lag_oldest_s=max(0.0, (now - found.oldest).total_seconds()) if found.oldest else None,
                recent_loss=sum(losses) / len(losses) if losses else None,
                recent_updates=len(losses),
                drift_detections=model.drift_detections,
                last_drift_detector=model.last_drift[0] if model.last_drift else None,
                last_drift_version=model.last_drift[1] if model.last_drift else None,
                rollout=(
                    {
                        "candidate_version": model.rollout.candidate_version,
                        "champion_version": model.rollout.champion_version,
                        "stage": model.rollout.stage,
                        "fraction": model.rollout.fraction,
                    }
                    if model.rollout is not None
                    else None
                ),
                updates_applied=model.updates_applied,
                updates_rejected=model.updates_rejected,
                rollbacks=model.rollbacks,
                rebaselines=model.rebaselines,
            )
        )
    return rows


def learning_state(model: Model) -> str:
    """``paused``, ``rollout`` or ``learning`` (a pause wins: nothing moves while paused)."""
    if model.paused:
        return "paused"
    if model.rollout is not None:
        return "rollout"
    return "learning"


def recent_losses(ledger: Ledger, model_id: UUID, n: int) -> list[float]:
    """``loss_before`` of the model's last ``n`` accepted updates, newest first.

    Reads the stream backwards in pages and stops as soon as ``n`` are found, so the
    cost does not grow with the model's history.
    """
    losses: list[float] = []
    seen = 0
    below: int | None = None
    while len(losses) < n and seen < MAX_TAIL_EVENTS:
        page = list(ledger.events.get(model_id, lte=below, desc=True, limit=min(PAGE, MAX_TAIL_EVENTS - seen)))
        for event in page:
            if isinstance(event, Model.UpdateApplied):
                losses.append(float(event.loss_before))
                if len(losses) == n:
                    break
        seen += len(page)
        if not page or page[-1].originator_version <= 1:
            break
        below = page[-1].originator_version - 1
    return losses


def label_backlog(ledger: Ledger, learned_through: Mapping[UUID, UUID | None]) -> dict[UUID, LabelBacklog]:
    """Each model's unconsumed labels: those committed after the label of its ``learned_through``.

    This is the position a learner resumes from (``server.learning_steps.resume_position``):
    the last prediction of the last recorded batch, whose label (or default label, both
    version 2 of the prediction) marks how far in the log the learner has read. Holdout
    labels before it were consumed too; late labels are never learnable.

    Args:
        ledger: the ledger to read.
        learned_through: per model id, its ``Model.learned_through`` (None: never learned).
    """
    if not learned_through:
        return {}
    recorder: Any = ledger.recorder
    if isinstance(recorder, LedgerRecorder) and not ledger.mapper.compressor and not ledger.mapper.cipher:
        return select_label_backlog(recorder, learned_through)
    return _scan_label_backlog(ledger, learned_through)


def select_label_backlog(
    recorder: LedgerRecorder, learned_through: Mapping[UUID, UUID | None]
) -> dict[UUID, LabelBacklog]:
    """SQL: per model, count and oldest commit time of its learnable labels after its resume position.

    One statement for the whole portfolio: the resume positions of all models are
    looked up together, then the labels after the smallest of them are scanned once
    (an index range on ``notification_id``) and grouped by the ``model_id`` field of
    their JSON state. The state is plain orjson (callers check no compressor or cipher
    is configured). The query text stays here, next to the only reader that needs it;
    it composes identifiers the way ``projections.store`` does.
    """
    from psycopg.sql import SQL, Identifier

    statement = SQL(
        "WITH m AS (SELECT * FROM unnest(%(ids)s::uuid[], %(through)s::uuid[]) AS m(model_id, through)), "
        "p AS (SELECT m.model_id, COALESCE(e.notification_id, 0) AS after FROM m "
        "LEFT JOIN {schema}.{table} e ON e.originator_id = m.through AND e.originator_version = 2), "
        "labels AS (SELECT e.notification_id, (d.j->>'model_id')::uuid AS model_id, "
        "(d.j->>'timestamp')::timestamptz AS at FROM {schema}.{table} e "
        "CROSS JOIN LATERAL (SELECT convert_from(e.state, 'UTF8')::jsonb AS j) d "
        "WHERE e.notification_id > (SELECT min(after) FROM p) AND e.topic = ANY(%(topics)s) "
        "AND (e.topic = %(default_topic)s OR (d.j->>'in_window')::boolean)) "
        "SELECT p.model_id, count(labels.notification_id) AS n, min(labels.at) AS oldest FROM p "
        "LEFT JOIN labels ON labels.model_id = p.model_id AND labels.notification_id > p.after "
        "GROUP BY p.model_id"
    ).format(schema=Identifier(recorder.datastore.schema), table=Identifier(recorder.events_table_name))
    ids = list(learned_through)
    params = {
        "ids": ids,
        "through": [learned_through[i] for i in ids],
        "topics": [LABELED_TOPIC, DEFAULT_LABELED_TOPIC],
        "default_topic": DEFAULT_LABELED_TOPIC,
    }
    with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
        curs.execute(statement, params)
        return {row["model_id"]: LabelBacklog(int(row["n"]), row["oldest"]) for row in curs.fetchall()}


def _scan_label_backlog(ledger: Ledger, learned_through: Mapping[UUID, UUID | None]) -> dict[UUID, LabelBacklog]:
    # Any other recorder (in-memory, in unit tests): the same rule, decoded in Python.
    after: dict[UUID, int] = {}
    for model_id, through in learned_through.items():
        position = None if through is None else ledger.recorder.select_notification_id(through, 2)  # type: ignore[attr-defined]
        after[model_id] = position or 0
    counts: dict[UUID, int] = dict.fromkeys(after, 0)
    oldest: dict[UUID, datetime] = {}
    start = min(after.values()) + 1
    while True:
        page = ledger.recorder.select_notifications(start, PAGE, topics=[LABELED_TOPIC, DEFAULT_LABELED_TOPIC])
        for notification in page:
            event: Any = ledger.mapper.to_domain_event(notification)
            model_id = event.model_id
            if model_id not in after or notification.id <= after[model_id]:
                continue
            if isinstance(event, Prediction.Labeled) and not event.in_window:
                continue
            counts[model_id] += 1
            oldest.setdefault(model_id, event.timestamp)
        if len(page) < PAGE:
            break
        start = page[-1].id + 1
    return {m: LabelBacklog(counts[m], oldest.get(m)) for m in after}
