"""The model-level regulator report: what served in a period, who changed what, and by how much.

Everything is answered from the log: which versions served predictions between two
times (``Prediction.Made``), when and how often; the model's own events in the period
(learning steps and rejected ones, pauses, resumes, rollbacks with their actor and
reason); prequential accuracy per version (``projections.performance``); and, by replay,
the size of every change to the parameters — the update norm ``‖Δθ‖`` and the largest
weight change ``max |Δw|`` of each version against the one before it. Replay checks every
recorded digest on the way, so the figures are those of the models that really served.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

import numpy as np

from domain.errors import InvalidArgumentError
from domain.ledger import Ledger
from domain.model import Model
from domain.seal import SEALS_ID, LogSeals
from projections.audit_log import feedback, served_predictions
from projections.digest import state_digest
from projections.lineage import describe_event, drift_summary, gate_summary
from projections.performance import performance_by_version
from projections.refold import Refolder, param_layout, params_vector
from projections.replay import Replayer, ReplayError

SCHEMA = "learnledger.model-report/1"
ENVELOPE_NOTE = (
    "The learner spec declares no change envelope yet. The hyperparameters below are what bounds a step today; "
    "the per-version figures are the observed envelope, computed by replay. Per-weight change bounds will be "
    "declared in the spec and enforced by the learning gates of issue 5; until then no update can be judged "
    "inside or outside an envelope."
)
ENVELOPE_FIELDS = (
    "kind",
    "optimizer",
    "learning_rate",
    "l2",
    "batch_size",
    "standardize",
    "threshold",
    "hidden",
    "seed",
)


def model_report(ledger: Ledger, replayer: Replayer, model_name: str, start: datetime, end: datetime) -> dict[str, Any]:
    """The report on ``model_name`` for ``start``..``end`` (inclusive) as a JSON-ready mapping.

    Raises:
        ModelNotFoundError: unknown model.
        InvalidArgumentError: ``start`` after ``end``.
        ReplayError: replay does not reproduce a recorded digest.
    """
    if start > end:
        raise InvalidArgumentError(f"the period starts after it ends ({start.isoformat()} > {end.isoformat()})")
    model = ledger.get_model(model_name)
    position = int(ledger.recorder.max_notification_id() or 0)
    events = ledger.get_model_events(model.id)
    served = served_predictions(ledger, model.id, since=start, until=end, upto=position)
    labels = feedback(ledger, model.id, upto=position)
    rows: dict[int, dict[str, Any]] = defaultdict(lambda: {"predictions": 0, "labeled": 0, "hits": 0.0})
    for p in served:
        row = rows[p.version]
        row["predictions"] += 1
        row.setdefault("first_prediction", p.time.isoformat())
        row["last_prediction"] = p.time.isoformat()
        found = labels.get(p.prediction_id)
        if found is not None:
            row["labeled"] += 1
            row["hits"] += (
                abs(p.decision - found.label) if model.spec.head == "regression" else p.decision == found.label
            )
    in_period = [e for e in events if start <= e.timestamp <= end]
    versions = sorted(set(rows) | {e.originator_version for e in in_period})
    changes = _changes(ledger, replayer, model, versions)
    table = [_version_row(model, events[v - 1], rows.get(v), changes.get(v)) for v in versions]
    total = len(served)
    labeled = sum(r["labeled"] for r in rows.values())
    hits = sum(r["hits"] for r in rows.values())
    metric = "mean absolute error" if model.spec.head == "regression" else "accuracy"
    observed = [c for c in changes.values() if c["update_norm"] is not None]
    return {
        "schema": SCHEMA,
        "model": model.name,
        "model_id": str(model.id),
        "period": {"from": start.isoformat(), "to": end.isoformat()},
        "head_version": len(events),
        "registered_at": events[0].timestamp.isoformat(),
        "registered_by": events[0].actor,
        "summary": {
            "versions": len(versions),
            "versions_served": len(rows),
            "predictions": total,
            "labeled": labeled,
            "metric": metric,
            "value": hits / labeled if labeled else None,
            "updates_applied": sum(isinstance(e, Model.UpdateApplied) for e in in_period),
            "updates_rejected": sum(isinstance(e, Model.UpdateRejected) for e in in_period),
            "rollbacks": sum(isinstance(e, Model.RolledBack) for e in in_period),
            "pauses": sum(isinstance(e, Model.Paused) for e in in_period),
        },
        "versions": table,
        "gate": {
            "rejected": [_rejected(e) for e in in_period if isinstance(e, Model.UpdateRejected)],
            "note": gate_summary(model),
        },
        "drift": drift_summary(model, in_period),
        "operations": [
            _operation(e) for e in in_period if isinstance(e, (Model.Paused, Model.Resumed, Model.RolledBack))
        ],
        "envelope": {
            "declared": _declared_envelope(model),
            "hyperparameters": _hyperparameters(model),
            "max_update_norm": max((c["update_norm"] for c in observed), default=None),
            "max_abs_weight_change": max((c["max_abs_weight_change"] for c in observed), default=None),
            "within_envelope": None,
            "note": ENVELOPE_NOTE,
        },
        "performance": performance_by_version(ledger, model.id, model.spec, upto=position).to_json(),
        "attestation": _attestation(ledger, position),
    }


def _changes(ledger: Ledger, replayer: Replayer, model: Model, versions: list[int]) -> dict[int, dict[str, Any]]:
    # One walk from the version before the first listed to the last, checking every
    # recorded digest; each version's change is against the state one version earlier.
    if not versions:
        return {}
    refolder = Refolder(ledger, replayer, model)
    layout = param_layout(model.spec)
    lo = max(1, versions[0] - 1)
    previous = params_vector(layout, refolder.state_at(lo))
    out: dict[int, dict[str, Any]] = {1: {"update_norm": None, "max_abs_weight_change": None}}
    for step in refolder.run(lo, versions[-1]):
        recorded = getattr(step.event, "digest", None)
        digest = state_digest(step.state)
        if recorded is not None and recorded != digest:
            raise ReplayError(f"version {step.version}: replayed digest {digest} differs from recorded {recorded}")
        now = params_vector(layout, step.state)
        delta = now - previous
        moved = np.abs(delta[layout.is_weight])
        out[step.version] = {
            "update_norm": float(np.linalg.norm(delta)),
            "max_abs_weight_change": float(moved.max()) if moved.size else 0.0,
            "digest": digest,
        }
        previous = now
    return out


def _version_row(
    model: Model, event: Any, served: dict[str, Any] | None, change: dict[str, Any] | None
) -> dict[str, Any]:
    served = served or {"predictions": 0, "labeled": 0, "hits": 0.0}
    labeled = served["labeled"]
    return {
        "version": event.originator_version,
        "created_by": describe_event(event),
        "event": type(event).__name__,
        "created_at": event.timestamp.isoformat(),
        "actor": event.actor,
        "predictions": served["predictions"],
        "first_prediction": served.get("first_prediction"),
        "last_prediction": served.get("last_prediction"),
        "labeled": labeled,
        "value": served["hits"] / labeled if labeled else None,
        "loss_before": getattr(event, "loss_before", None),
        "loss_after": getattr(event, "loss_after", None),
        "update_norm": (change or {}).get("update_norm"),
        "max_abs_weight_change": (change or {}).get("max_abs_weight_change"),
        "params_digest": (change or {}).get("digest") or getattr(event, "digest", None) or model.digest,
    }


def _declared_envelope(model: Model) -> dict[str, Any] | None:
    p = model.spec.policy
    declared: dict[str, Any] = {}
    if p.max_update_norm > 0:
        declared["max_update_norm"] = p.max_update_norm
    if p.weight_bound > 0:
        declared["weight_bound"] = p.weight_bound
    if p.feature_bounds:
        declared["feature_bounds"] = {name: [low, high] for name, low, high in p.feature_bounds}
    return declared or None


def _hyperparameters(model: Model) -> dict[str, Any]:
    spec = model.spec.to_dict()
    fields = [k for k in ENVELOPE_FIELDS if k != "hidden" or model.spec.kind == "mlp"]  # linear kinds ignore it
    return {k: spec[k] for k in fields}


def _rejected(event: Model.UpdateRejected) -> dict[str, Any]:
    return {
        "version": event.originator_version,
        "time": event.timestamp.isoformat(),
        "reason": event.reason,
        "actor": event.actor,
        "examples": len(event.prediction_ids),
        "loss_before": event.loss_before,
        "loss_after": event.loss_after,
    }


def _operation(event: Any) -> dict[str, Any]:
    return {
        "version": event.originator_version,
        "kind": {"Paused": "pause", "Resumed": "resume", "RolledBack": "rollback"}[type(event).__name__],
        "time": event.timestamp.isoformat(),
        "actor": event.actor,
        "reason": event.reason,
        "to_version": getattr(event, "to_version", None),
    }


def _attestation(ledger: Ledger, position: int) -> dict[str, Any]:
    chain = [e for e in ledger.events.get(SEALS_ID) if isinstance(e, LogSeals.Sealed)]
    sealed = chain[-1].last if chain else 0
    return {
        "log_position": position,
        "seal": chain[-1].seal if chain else "none yet",
        "sealed_through": sealed,
        "seal_note": (
            f"positions 1..{sealed} are covered by {len(chain)} seal(s); "
            + ("the rest is not sealed yet" if sealed < position else "the whole log read is sealed")
            if chain
            else "no seal covers the log yet (learnledger audit seal adds one)"
        ),
        "replay": "every version listed was replayed and its recorded parameters digest reproduced",
    }
