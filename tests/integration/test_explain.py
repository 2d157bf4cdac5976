"""Explaining past decisions on real PostgreSQL: replayed scores, exact reasons, flips, lineage."""

from __future__ import annotations

import itertools
import math
from typing import Any
from uuid import UUID, uuid4

import jax.numpy as jnp
import numpy as np
import pytest

from domain.errors import PredictionNotFoundError
from domain.model import Model
from domain.prediction import MADE_TOPIC, Prediction, make_prediction_event
from domain.spec import LearnerSpec
from projections.counterfactual import rescore
from projections.explain import SCORE_TOLERANCE, ExplanationMismatchError, explain_prediction
from projections.learners import logits_fn
from projections.performance import performance_by_version
from server.simulate import run_simulation
from server.streams import drifting_binary_stream

LOGISTIC = LearnerSpec(kind="logistic", n_features=4, batch_size=4, learning_rate=0.05)
SPECS = {
    "logistic": LOGISTIC,
    "linear": LearnerSpec(kind="linear", n_features=4, batch_size=4, optimizer="sgd", learning_rate=0.01),
    "softmax": LearnerSpec(kind="softmax", n_features=4, n_classes=3, batch_size=4, learning_rate=0.05),
    "mlp": LearnerSpec(kind="mlp", n_features=4, head="binary", hidden=(8,), batch_size=4, learning_rate=0.02),
    "mlp-multiclass": LearnerSpec(kind="mlp", n_features=4, head="multiclass", n_classes=3, hidden=(6,), batch_size=4),
}


def _labels(spec: LearnerSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if spec.head == "multiclass":
        return (np.abs(x[:, 0] * 7).astype(int) % spec.n_classes).astype(float)
    if spec.head == "regression":
        return x @ np.linspace(-1.0, 1.0, spec.n_features) * 0.01
    return y


def _simulate(rt: Any, name: str, spec: LearnerSpec, n: int, seed: int = 0) -> Any:
    stream = drifting_binary_stream(n, n_features=spec.n_features, seed=seed)
    return run_simulation(rt.service, name, stream.x, _labels(spec, stream.x, stream.y), label_delays=np.full(n, 3))


def _made(rt: Any, model_id: UUID) -> list[Prediction.Made]:
    """Every logged prediction of one model, in log order."""
    out: list[Prediction.Made] = []
    start = 1
    while True:
        page = rt.ledger.recorder.select_notifications(start, 1000, topics=[MADE_TOPIC])
        events = [rt.ledger.mapper.to_domain_event(n) for n in page]
        out.extend(e for e in events if e.model_id == model_id)
        if len(page) < 1000:
            return out
        start = page[-1].id + 1


def _history_with_rollback(rt: Any) -> tuple[Model, int, int]:
    """A logistic model with ~45 updates, a rollback to version 10, then ~25 more updates."""
    rt.service.register_model("m", LOGISTIC, "test")
    _simulate(rt, "m", LOGISTIC, 180, seed=1)
    rolled = rt.service.roll_back("m", 10, "bad batch suspected", "operator")
    _simulate(rt, "m", LOGISTIC, 100, seed=2)
    return rt.ledger.get_model("m"), 10, rolled.version


def test_recomputed_scores_match_for_20_versions_including_after_a_rollback(runtime: Any) -> None:
    model, _, rollback_version = _history_with_rollback(runtime)
    by_version: dict[int, Prediction.Made] = {}
    for made in _made(runtime, model.id):
        by_version.setdefault(made.model_version, made)
    before = [v for v in sorted(by_version) if v < rollback_version]
    after = [v for v in sorted(by_version) if v >= rollback_version]
    assert rollback_version in after  # served by the rolled-back state itself
    chosen = before[:: max(1, len(before) // 12)][:12] + after[:: max(1, len(after) // 8)][:8]
    assert len(set(chosen)) == 20
    for version in chosen:
        made = by_version[version]
        explanation = explain_prediction(runtime.ledger, runtime.service.replayer, made.originator_id)
        decision = explanation.decision
        assert decision.model_version == version
        assert decision.score_matches
        assert abs(decision.recomputed_score - made.score) <= SCORE_TOLERANCE
        assert decision.recomputed_score == made.score  # same float32 scorer: normally bit-equal
        assert decision.replayed_digest == made.params_digest
        assert explanation.attestation.seal == "none yet"
        assert explanation.attestation.log_position >= (decision.log_position or 0)


@pytest.mark.parametrize("kind", ["logistic", "linear", "softmax", "mlp", "mlp-multiclass"])
def test_contributions_sum_to_the_explained_output(runtime: Any, kind: str) -> None:
    spec = SPECS[kind]
    runtime.service.register_model(kind, spec, "test")
    _simulate(runtime, kind, spec, 120)
    model = runtime.ledger.get_model(kind)
    made = _made(runtime, model.id)[100]
    explanation = explain_prediction(runtime.ledger, runtime.service.replayer, made.originator_id)
    reasons = explanation.reasons
    total = reasons.baseline_output + sum(c.contribution for c in reasons.contributions)
    # Independently: the model's own raw output for the decided class from the rebuilt state.
    state = runtime.service.replayer.state_at(model.id, made.model_version).state
    index = int(made.decision) if spec.head == "multiclass" else 0
    output = float(np.asarray(logits_fn(spec)(state, jnp.asarray(made.features, jnp.float32)))[index])
    assert reasons.output == pytest.approx(output, abs=1e-6)
    if spec.kind == "mlp":
        assert reasons.steps is not None and reasons.steps >= 128
        assert reasons.completeness_gap < 1e-3 * max(1.0, abs(output - reasons.baseline_output))
        assert abs(total - output) == pytest.approx(reasons.completeness_gap, abs=1e-9)
    else:
        assert abs(total - output) <= 1e-5
        assert reasons.completeness_gap <= 1e-5
    if kind == "logistic" and 1e-4 < made.score < 1 - 1e-4:
        assert math.log(made.score / (1 - made.score)) == pytest.approx(total, abs=1e-4)
    ranked = [abs(c.contribution) for c in reasons.contributions]
    assert ranked == sorted(ranked, reverse=True)
    assert 1 <= len(reasons.top_reasons) <= 4


@pytest.mark.parametrize("kind", ["logistic", "softmax", "mlp", "mlp-multiclass"])
def test_the_counterfactual_change_flips_the_decision_when_applied(runtime: Any, kind: str) -> None:
    spec = SPECS[kind]
    runtime.service.register_model(kind, spec, "test")
    _simulate(runtime, kind, spec, 120)
    model = runtime.ledger.get_model(kind)
    made = _made(runtime, model.id)[110]
    explanation = explain_prediction(runtime.ledger, runtime.service.replayer, made.originator_id)
    state = runtime.service.replayer.state_at(model.id, made.model_version).state
    cf = explanation.counterfactual
    assert cf.applicable
    for flip in (cf.minimal, cf.single_feature):
        assert flip is not None, cf.note
        x = dict(explanation.decision.features)
        for change in flip.changes:
            assert change.new_value == pytest.approx(change.value + change.change)
            x[change.feature] = change.new_value
        score, decision = rescore(spec, state, np.asarray([x[f] for f in spec.feature_names]))
        assert decision != made.decision
        assert flip.flips and flip.new_decision == decision and flip.new_score == score
    assert cf.single_feature is not None and len(cf.single_feature.changes) == 1
    if spec.kind == "logistic":
        # Minimal-L2 in standardised units: never farther than the best single-feature move.
        assert cf.minimal is not None
        assert cf.minimal.distance_sd <= cf.single_feature.distance_sd + 1e-9


def test_regression_has_no_decision_to_flip(runtime: Any) -> None:
    spec = LearnerSpec(kind="linear", n_features=4, batch_size=4, optimizer="sgd", learning_rate=0.01)
    runtime.service.register_model("r", spec, "test")
    _simulate(runtime, "r", spec, 40)
    made = _made(runtime, runtime.ledger.get_model("r").id)[30]
    explanation = explain_prediction(runtime.ledger, runtime.service.replayer, made.originator_id)
    assert not explanation.counterfactual.applicable
    assert explanation.decision.threshold is None


def test_afterwards_names_the_update_that_learned_from_it_and_the_rollback(runtime: Any) -> None:
    model, target, rollback_version = _history_with_rollback(runtime)
    events = runtime.ledger.get_model_events(model.id)
    learned_in = {
        pid: e.originator_version for e in events if isinstance(e, Model.UpdateApplied) for pid in e.prediction_ids
    }
    made = _made(runtime, model.id)
    abandoned = next(m for m in made if target < m.model_version < rollback_version and m.originator_id in learned_in)
    kept = next(m for m in made if m.model_version < target and learned_in.get(m.originator_id, 99) <= target)

    explained = explain_prediction(runtime.ledger, runtime.service.replayer, abandoned.originator_id)
    after = explained.afterwards
    assert after.label is not None and after.label_in_window
    assert after.learned.applied_in_version == learned_in[abandoned.originator_id]
    assert after.learned.still_in_head_lineage is (learned_in[abandoned.originator_id] <= target)
    assert [(r.version, r.to_version) for r in after.rolled_back] == [(rollback_version, target)]
    assert after.rolled_back[0].reason == "bad batch suspected" and after.rolled_back[0].actor == "operator"
    assert after.head_version == model.version

    explained = explain_prediction(runtime.ledger, runtime.service.replayer, kept.originator_id)
    assert explained.afterwards.rolled_back == ()
    assert explained.afterwards.learned.applied_in_version == learned_in[kept.originator_id]
    assert explained.afterwards.learned.still_in_head_lineage is True


def test_provenance_counts_the_updates_and_examples_behind_the_version(runtime: Any) -> None:
    model, target, rollback_version = _history_with_rollback(runtime)
    made = _made(runtime, model.id)
    served_by_rollback = next(m for m in made if m.model_version == rollback_version)
    served_by_target = next(m for m in made if m.model_version == target)
    at_rollback = explain_prediction(runtime.ledger, runtime.service.replayer, served_by_rollback.originator_id)
    at_target = explain_prediction(runtime.ledger, runtime.service.replayer, served_by_target.originator_id)
    # The rolled-back version descends from exactly the target's updates and examples.
    lineage, target_lineage = at_rollback.provenance.lineage, at_target.provenance.lineage
    assert lineage.updates == target_lineage.updates == target - 1
    assert lineage.labeled_examples == target_lineage.labeled_examples == (target - 1) * LOGISTIC.batch_size
    assert lineage.examples_digest == target_lineage.examples_digest
    assert lineage.update_ranges == ((2, target),)
    assert lineage.rollbacks == 1 and "rollback to version 10" in lineage.created_by
    assert lineage.updates_applied == rollback_version - 2  # every update recorded before it, kept or not
    assert lineage.last_gate is not None and lineage.last_gate.verdict == "applied"
    assert lineage.last_gate.version == rollback_version - 1
    provenance = at_rollback.provenance
    assert provenance.spec == LOGISTIC.to_dict()
    assert provenance.platform["jax"] and provenance.platform_differences == {}
    assert provenance.paused is False and provenance.rollout_stage == "champion"


def test_pause_state_at_the_version_is_reported(runtime: Any) -> None:
    runtime.service.register_model("p", LOGISTIC, "test")
    _simulate(runtime, "p", LOGISTIC, 40)
    runtime.service.pause("p", "investigating", "operator")
    _simulate(runtime, "p", LOGISTIC, 10, seed=3)
    model = runtime.ledger.get_model("p")
    made = _made(runtime, model.id)[-1]
    assert made.model_version == model.version
    explanation = explain_prediction(runtime.ledger, runtime.service.replayer, made.originator_id)
    assert explanation.provenance.paused is True
    assert "pause" in explanation.provenance.lineage.created_by


def test_a_tampered_logged_score_fails_loudly(runtime: Any) -> None:
    runtime.service.register_model("t", LOGISTIC, "test")
    _simulate(runtime, "t", LOGISTIC, 40)
    model = runtime.ledger.get_model("t")
    genuine = _made(runtime, model.id)[30]

    def forge(**changes: Any) -> UUID:
        fields = {
            "model_id": model.id,
            "model_name": "t",
            "model_version": genuine.model_version,
            "spec": LOGISTIC,
            "features": genuine.features,
            "score": genuine.score,
            "decision": genuine.decision,
            "params_digest": genuine.params_digest,
            "routing": "champion",
            "actor": "forger",
            "timestamp": genuine.timestamp,
        }
        fields.update(changes)
        pid = uuid4()
        runtime.ledger.record([make_prediction_event(pid, **fields)])
        return pid

    honest = forge()
    assert explain_prediction(runtime.ledger, runtime.service.replayer, honest).decision.score_matches
    with pytest.raises(ExplanationMismatchError, match="logged score"):
        explain_prediction(runtime.ledger, runtime.service.replayer, forge(score=genuine.score + 0.01))
    with pytest.raises(ExplanationMismatchError, match="logged score"):
        explain_prediction(runtime.ledger, runtime.service.replayer, forge(decision=1.0 - genuine.decision))
    with pytest.raises(ExplanationMismatchError, match="digest"):
        explain_prediction(runtime.ledger, runtime.service.replayer, forge(params_digest="sha256:" + "0" * 64))


def test_an_unknown_prediction_is_not_found(runtime: Any) -> None:
    with pytest.raises(PredictionNotFoundError):
        explain_prediction(runtime.ledger, runtime.service.replayer, uuid4())


def test_accuracy_over_versions_is_bounded_and_agrees_with_the_simulation(runtime: Any) -> None:
    spec = LearnerSpec(kind="logistic", n_features=4, batch_size=2, learning_rate=0.05)
    runtime.service.register_model("a", spec, "test")
    result = _simulate(runtime, "a", spec, 300)
    model = runtime.ledger.get_model("a")
    series = performance_by_version(runtime.ledger, model.id, spec)
    assert model.version > 100 and 1 <= len(series.points) <= 50
    assert series.labeled == result.labels == 300
    assert series.overall == pytest.approx(result.accuracy)
    assert sum(p.labeled for p in series.points) == 300
    versions = [(p.first_version, p.last_version) for p in series.points]
    assert all(a <= b for a, b in versions) and all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(versions))
