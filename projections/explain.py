"""Explanation of one past decision, re-derived from the log by replay, never from a cache.

``explain_prediction`` rebuilds the exact model version that served a prediction,
re-scores the logged features with it and refuses to explain anything it cannot
reproduce; then it reports the reasons (``projections.attribution``), the smallest
change that would have flipped the decision (``projections.counterfactual``), where the
version came from and what happened afterwards (``projections.lineage``), and the log
position it was computed against.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import numpy as np

from domain.ledger import Ledger
from domain.model import Model
from domain.seal import SEALS_ID, LogSeals
from domain.spec import LearnerSpec
from projections.attribution import Attribution, attribute, standardisation
from projections.counterfactual import Counterfactuals, find_counterfactuals, rescore
from projections.lineage import (
    LearnedFrom,
    Lineage,
    RollbackFact,
    drift_summary,
    learned_from,
    lineage_at,
    rollbacks_affecting,
)
from projections.platform import platform_differences, platform_fingerprint
from projections.replay import Replayer, ReplayError

SCORE_TOLERANCE = 1e-6
TOLERANCE_TEXT = (
    "|recomputed - logged| ≤ 1e-6 (absolute). The float32 scorer is deterministic, so the scores are "
    "normally identical; a row scored inside a batch of another size may differ in the last bit "
    "(≤ 1.2e-7 measured for an MLP)."
)
MAX_REASONS = 4
SEAL_NONE = "none yet"
SCHEMA = "learnledger.explanation/1"


class ExplanationMismatchError(ReplayError):
    """Replay does not reproduce a logged prediction: the log, the code or the platform changed."""


@dataclass(frozen=True)
class Decision:
    """What was decided, by which version, from which inputs; and the replay check."""

    prediction_id: UUID
    time: datetime
    model: str
    model_version: int
    params_digest: str
    replayed_digest: str
    features: dict[str, float]  # as used, in the spec's feature order
    head: str
    score: float
    recomputed_score: float
    score_delta: float
    tolerance: float
    tolerance_text: str
    score_matches: bool
    decision: float
    threshold: float | None
    decision_text: str
    routing: str
    caller: str
    log_position: int | None


@dataclass(frozen=True)
class Contribution:
    """One feature's share of the explained output (ranked by magnitude, 1 = largest)."""

    rank: int
    feature: str
    value: float
    baseline: float
    contribution: float


@dataclass(frozen=True)
class Reasons:
    """Contributions summing to the explained output, and at most four plain sentences."""

    method: str
    output_name: str
    output: float
    baseline_output: float
    completeness_gap: float
    steps: int | None
    contributions: tuple[Contribution, ...]
    top_reasons: tuple[str, ...]


@dataclass(frozen=True)
class Provenance:
    """Spec, platform, code and the recorded history that produced the version."""

    spec: dict[str, Any]
    registered_at: datetime
    registered_by: str
    platform: dict[str, str]
    code_versions: dict[str, str]
    platform_differences: dict[str, tuple[str, str]]
    lineage: Lineage
    paused: bool
    drift: str
    rollout_stage: str


@dataclass(frozen=True)
class Afterwards:
    """The prediction's own label, the update that learned from it, and rollbacks of its version."""

    label: float | None
    label_source: str | None
    label_in_window: bool | None
    label_defaulted: bool
    learned: LearnedFrom
    rolled_back: tuple[RollbackFact, ...]
    head_version: int


@dataclass(frozen=True)
class Attestation:
    """What the report was computed against."""

    log_position: int
    seal: str
    seal_note: str
    replay: str


@dataclass(frozen=True)
class Explanation:
    """The full explanation of one decision."""

    decision: Decision
    reasons: Reasons
    counterfactual: Counterfactuals
    provenance: Provenance
    afterwards: Afterwards
    attestation: Attestation

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping (UUIDs and times as strings, tuples as lists)."""
        return {"schema": SCHEMA, **_plain(self)}


def explain_prediction(ledger: Ledger, replayer: Replayer, prediction_id: UUID) -> Explanation:
    """Explain a logged decision from the log alone.

    Args:
        ledger: the ledger holding the prediction and its model's history.
        replayer: rebuilds the serving version's state (snapshots are a checked cache).
        prediction_id: the prediction to explain.

    Returns:
        The explanation; its score was recomputed and matched.

    Raises:
        PredictionNotFoundError: no such prediction.
        ExplanationMismatchError: replay does not reproduce the logged digest or score.
        ReplayError: the model's history itself does not replay.
    """
    prediction = ledger.get_prediction(prediction_id)
    model = ledger.get_model_by_id(prediction.model_id)
    spec: LearnerSpec = model.spec
    version = prediction.model_version
    folded = replayer.state_at(model.id, version)
    if folded.digest != prediction.params_digest:
        raise ExplanationMismatchError(
            f"prediction {prediction_id} records params digest {prediction.params_digest}, but replaying "
            f"{model.name!r} to version {version} gives {folded.digest}"
        )
    x = np.asarray(prediction.features, np.float64)
    score, decision = rescore(spec, folded.state, x)
    delta = abs(score - prediction.score)
    if delta > SCORE_TOLERANCE or decision != prediction.decision:
        raise ExplanationMismatchError(
            f"prediction {prediction_id} logged score {prediction.score!r} (decision {prediction.decision:g}); "
            f"version {version} rebuilt by replay scores {score!r} (decision {decision:g}), "
            f"|Δ| = {delta:.3g} > tolerance {SCORE_TOLERANCE:g}"
        )
    store: Any = ledger.recorder
    position = store.select_notification_id(prediction_id, 1) if hasattr(store, "select_notification_id") else None
    decided = Decision(
        prediction_id=prediction_id,
        time=prediction.created_on,
        model=model.name,
        model_version=version,
        params_digest=prediction.params_digest,
        replayed_digest=folded.digest,
        features=dict(zip(spec.feature_names, (float(v) for v in x), strict=True)),
        head=spec.head,
        score=prediction.score,
        recomputed_score=score,
        score_delta=delta,
        tolerance=SCORE_TOLERANCE,
        tolerance_text=TOLERANCE_TEXT,
        score_matches=True,
        decision=prediction.decision,
        threshold=spec.threshold if spec.head == "binary" else None,
        decision_text=decision_text(spec, prediction.decision),
        routing=prediction.routing,
        caller=prediction.actor,
        log_position=position,
    )
    baseline = standardisation(spec, folded.state).mean
    reasons = _reasons(spec, attribute(spec, folded.state, x, decision), x, baseline, decision)
    counterfactual = find_counterfactuals(spec, folded.state, x, decision)
    events = ledger.get_model_events(model.id)
    provenance = _provenance(ledger, model, events, version, prediction.routing)
    afterwards = Afterwards(
        label=prediction.label,
        label_source=prediction.label_source,
        label_in_window=prediction.in_window,
        label_defaulted=prediction.defaulted,
        learned=learned_from(events, prediction_id),
        rolled_back=rollbacks_affecting(events, version),
        head_version=events[-1].originator_version,
    )
    # Taken last: every event read above was committed at or before this position.
    attestation = Attestation(
        log_position=int(ledger.recorder.max_notification_id() or 0),
        **_seal_for(ledger, prediction_id),
        replay=f"Model {model.name!r} was replayed to version {version}; every recorded digest on the way matched",
    )
    return Explanation(decided, reasons, counterfactual, provenance, afterwards, attestation)


def decision_text(spec: LearnerSpec, decision: float) -> str:
    """The decision in words."""
    if spec.head == "binary":
        side = "at or above" if decision == 1.0 else "below"
        return f"{decision:g}: the score is {side} the threshold {spec.threshold:g}"
    if spec.head == "multiclass":
        return f"class {decision:g}: the most probable of {spec.n_classes} classes"
    return "the predicted value itself (a regression has no threshold)"


def reason_sentences(
    spec: LearnerSpec, contributions: tuple[Contribution, ...], decision: float, limit: int = MAX_REASONS
) -> tuple[str, ...]:
    """At most ``limit`` plain sentences, largest contribution first (adverse-action style)."""
    target = {"binary": "the score", "multiclass": f"the support for class {decision:g}"}.get(
        spec.head, "the prediction"
    )
    reference = "the average" if spec.standardize else "the reference value"
    out: list[str] = []
    for c in contributions:
        if len(out) == limit or c.contribution == 0.0:
            break
        relation = "above" if c.value > c.baseline else "below" if c.value < c.baseline else "equal to"
        verb = "raised" if c.contribution > 0 else "lowered"
        most = " the most" if not out else ""
        out.append(
            f"{c.feature} ({_num(c.value)}, {relation} {reference} of {_num(c.baseline)}) {verb} {target}{most}."
        )
    return tuple(out)


def _reasons(spec: LearnerSpec, found: Attribution, x: np.ndarray, baseline: np.ndarray, decision: float) -> Reasons:
    order = np.argsort(-np.abs(found.contributions), kind="stable")
    contributions = tuple(
        Contribution(rank, spec.feature_names[j], float(x[j]), float(baseline[j]), float(found.contributions[j]))
        for rank, j in enumerate(order, start=1)
    )
    return Reasons(
        method=found.method,
        output_name=found.output_name,
        output=found.output,
        baseline_output=found.baseline_output,
        completeness_gap=found.completeness_gap,
        steps=found.steps,
        contributions=contributions,
        top_reasons=reason_sentences(spec, contributions, decision),
    )


def _provenance(ledger: Ledger, model: Model, events: list[Any], version: int, routing: str) -> Provenance:
    registered = events[0]
    recorded = dict(registered.platform)
    code = {"learnledger": _package_version("learnledger")}
    code.update({f"{k} (recorded)": recorded[k] for k in ("jax", "jaxlib", "optax") if k in recorded})
    now = dict(platform_fingerprint())
    code.update({f"{k} (replayed with)": now[k] for k in ("jax", "jaxlib", "optax")})
    return Provenance(
        spec=model.spec.to_dict(),
        registered_at=registered.timestamp,
        registered_by=registered.actor,
        platform=recorded,
        code_versions=code,
        platform_differences=platform_differences(registered.platform),
        lineage=lineage_at(events, version),
        paused=ledger.get_model_at(model.name, version).paused,
        drift=drift_summary(model, [e for e in events if e.originator_version <= version]),
        rollout_stage=routing,
    )


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _num(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _seal_for(ledger: Ledger, prediction_id: UUID) -> dict[str, str]:
    """The seal covering the prediction's log position, if one does yet."""
    recorder: Any = ledger.recorder
    position = (
        recorder.select_notification_id(prediction_id, 1) if hasattr(recorder, "select_notification_id") else None
    )
    chain = [e for e in ledger.events.get(SEALS_ID) if isinstance(e, LogSeals.Sealed)]
    for number, sealed in enumerate(chain, start=1):
        if position is not None and sealed.first <= position <= sealed.last:
            return {
                "seal": sealed.seal,
                "seal_note": (
                    f"the decision (log position {position}) is covered by seal {number} of {len(chain)} "
                    f"(positions {sealed.first}..{sealed.last}); the chain head is {chain[-1].seal}"
                ),
            }
    return {
        "seal": SEAL_NONE,
        "seal_note": "no seal covers this log position yet (learnledger audit seal adds one)",
    }
