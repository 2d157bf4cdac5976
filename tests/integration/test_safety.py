"""Safety scenarios on generated streams, end to end against PostgreSQL: a poisoned
feedback burst meets the gate, an abrupt concept drift pauses learning, a bad
rebaseline candidate aborts at the first rollout stage, and audit verify re-derives
every verdict and detection."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from domain.ids import new_prediction_id
from domain.ledger import LabelRequest
from domain.model import Model
from domain.policy import SafetyPolicy
from domain.prediction import make_prediction_event
from domain.spec import LearnerSpec
from projections.learners import decide_rows, make_learner
from projections.rollout import routes_to_candidate
from server.learning_steps import examples, load_learner
from server.simulate import run_simulation

N_FEATURES = 5


def _stream(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=N_FEATURES)
    x = rng.normal(size=(n, N_FEATURES))
    y = (x @ w + 0.3 * rng.normal(size=n) > 0).astype(float)
    return x, y, w


def _clean_accuracy(rt: Any, spec: LearnerSpec, w: np.ndarray) -> float:
    rng = np.random.default_rng(99)
    xt = rng.normal(size=(4000, N_FEATURES))
    yt = (xt @ w > 0).astype(float)
    state = rt.service.replayer.state_at(rt.ledger.get_model("m").id).state
    return float(((make_learner(spec).predict(state, xt) > 0.5) == yt).mean())


def _events(rt: Any, kind: type) -> list[Any]:
    model = rt.ledger.get_model("m")
    return [e for e in rt.ledger.get_model_events(model.id) if isinstance(e, kind)]


@pytest.mark.slow
@pytest.mark.parametrize("gated", [True, False])
def test_poisoned_burst_is_rejected_by_the_gate_and_clean_accuracy_holds(runtime: Any, gated: bool) -> None:
    # Given a logistic model learning a clean stream, with or without the holdout gate
    x, y, w = _stream(7200)
    y[4000:4600] = 1 - y[4000:4600]  # a source sends flipped labels for 600 predictions
    policy = SafetyPolicy(holdout_fraction=0.2, holdout_size=1000, gate_tolerance=0.005) if gated else SafetyPolicy()
    spec = LearnerSpec(kind="logistic", n_features=N_FEATURES, learning_rate=0.05, policy=policy)
    runtime.service.register_model("m", spec, "test")
    run_simulation(runtime.service, "m", x[:4000], y[:4000])
    before = _clean_accuracy(runtime, spec, w)
    versions_before = runtime.ledger.get_model("m").version
    # When the poisoned burst arrives
    run_simulation(runtime.service, "m", x[4000:4600], y[4000:4600])
    after = _clean_accuracy(runtime, spec, w)
    run_simulation(runtime.service, "m", x[4600:], y[4600:])
    rejected = [e for e in _events(runtime, Model.UpdateRejected) if e.originator_version > versions_before]
    # Then with the gate, updates of the burst are refused and clean accuracy holds
    if gated:
        assert before > 0.95
        assert any("paired non-inferiority t-test" in e.reason for e in rejected)
        assert all(e.gate is not None and e.gate["holdout_n"] > 0 for e in rejected)
        assert after > 0.8
    else:
        assert not rejected
        assert after < 0.5  # what the gate prevents: the burst turns the model around
    # And audit verify re-derives every gate verdict
    report = runtime.service.replayer.verify(runtime.ledger.get_model("m").id)
    assert report.verified, report.divergence


def test_holdout_examples_are_recorded_and_never_trained_on(runtime: Any) -> None:
    x, y, _ = _stream(2000, seed=1)
    policy = SafetyPolicy(holdout_fraction=0.25, min_holdout=20, gate_tolerance=0.05)
    spec = LearnerSpec(kind="logistic", n_features=N_FEATURES, policy=policy)
    runtime.service.register_model("m", spec, "test")
    run_simulation(runtime.service, "m", x, y)
    updates = _events(runtime, Model.UpdateApplied) + _events(runtime, Model.UpdateRejected)
    trained = [pid for e in updates for pid in e.prediction_ids]
    held = [pid for e in updates for pid in e.holdout_ids]
    assert not set(trained) & set(held)
    assert 0.15 < len(held) / (len(held) + len(trained)) < 0.35
    assert runtime.service.replayer.verify(runtime.ledger.get_model("m").id).verified


@pytest.mark.parametrize("detectors", [("adwin",), ("page_hinkley",)])
def test_abrupt_drift_is_detected_within_bounded_labels_and_pauses_learning(runtime: Any, detectors: tuple) -> None:
    # Given a model watching its served errors
    x, y, w = _stream(6000, seed=2)
    y[3000:] = (x[3000:] @ -w > 0).astype(float)  # the concept flips at example 3000
    spec = LearnerSpec(
        kind="logistic",
        n_features=N_FEATURES,
        learning_rate=0.05,
        policy=SafetyPolicy(drift_detectors=detectors, drift_action="pause"),
    )
    runtime.service.register_model("m", spec, "test")
    # When the stream runs through the drift
    run_simulation(runtime.service, "m", x, y)
    # Then exactly one detection, by that detector, at a post-drift prediction, within 400 labels
    (drift,) = _events(runtime, Model.DriftDetected)
    assert drift.detector == detectors[0]
    assert drift.action == "pause"
    position = _example_index(runtime, drift.at_prediction)
    assert 3000 <= position < 3400
    model = runtime.ledger.get_model("m")
    assert model.paused and "drift" in model.pause_reason
    assert model.drift_detections == 1
    # And learning stopped at the detection: no update after it
    assert all(e.originator_version < drift.originator_version for e in _events(runtime, Model.UpdateApplied))
    # And replay re-derives the detection at the same prediction
    report = runtime.service.replayer.verify(model.id)
    assert report.verified, report.divergence


def _example_index(rt: Any, prediction_id: Any) -> int:
    # simulate predicts examples in order: the n-th Made of the model is example n
    made = sorted(
        (e for e in rt.ledger.get_predictions([prediction_id]).values()),
        key=lambda p: p.id,
    )
    target = made[0]
    model = rt.ledger.get_model("m")
    updates = _events(rt, Model.UpdateApplied) + _events(rt, Model.UpdateRejected)
    ids = [pid for e in sorted(updates, key=lambda e: e.originator_version) for pid in e.prediction_ids]
    del model
    return ids.index(target.id)


def test_a_bad_rebaseline_candidate_aborts_at_the_first_stage(runtime: Any) -> None:
    # Given a learned champion
    x, y, _ = _stream(6000, seed=3)
    policy = SafetyPolicy(drift_detectors=("adwin",), drift_action="rebaseline", rollout_min_labels=20)
    spec = LearnerSpec(kind="logistic", n_features=N_FEATURES, learning_rate=0.05, policy=policy)
    model = runtime.service.register_model("m", spec, "test")
    run_simulation(runtime.service, "m", x[:2000], y[:2000])
    learner = load_learner(runtime.ledger, runtime.service.replayer, model.id)
    champion_digest = learner.digest
    # When a rebaseline re-fits on a window of flipped labels (really in the log)
    _, flipped = _serve_and_label(runtime, learner, x[2000:2600], 1 - y[2000:2600])
    learner.safety.recent.clear()
    learner.safety.recent.extend(e.as_example() for e in examples(runtime.ledger, flipped, 0.0))
    learner.rebaseline_recent(None, reason="test: a bad candidate")
    runtime.ledger.record(list(learner.model.collect_events()))
    head = runtime.ledger.get_model("m")
    assert head.rollout is not None and head.rollout.fraction == 0.01
    # And live traffic is split by prediction id, each arm scored by its own state
    served_events, label_events = _serve_and_label(runtime, learner, x[2600:], y[2600:])
    canary = [e for e in served_events if e.routing == "candidate"]
    assert 0 < len(canary) < 0.05 * len(served_events)
    # Then the learner aborts the rollout at the first stage and the champion serves again
    for example in examples(runtime.ledger, label_events, 0.0):
        learner.add(example)
        if learner.ready():
            runtime.ledger.record(learner.step())
            break
    (aborted,) = _events(runtime, Model.RolloutAborted)
    assert aborted.digest == champion_digest
    assert aborted.figures["candidate_loss"] > aborted.figures["control_loss"]
    head = runtime.ledger.get_model("m")
    assert head.rollout is None and head.digest == champion_digest
    assert not _events(runtime, Model.RolloutAdvanced)  # never beyond 1 %
    report = runtime.service.replayer.verify(head.id)
    assert report.verified, report.divergence


def _serve_and_label(rt: Any, learner: Any, x: np.ndarray, y: np.ndarray) -> tuple[list[Any], list[Any]]:
    from server.catalog import served_by

    served = served_by(learner)
    made = []
    now = datetime.now(UTC)
    for row in x:
        pid = new_prediction_id()
        arm = served.candidate if served.candidate and routes_to_candidate(pid, served.fraction) else served
        scores, decisions = decide_rows(arm.spec, arm.learner.predict_proba(arm.state, row[None, :]))
        made.append(
            make_prediction_event(
                pid,
                model_id=served.model_id,
                model_name="m",
                model_version=arm.version,
                spec=arm.spec,
                features=tuple(row.tolist()),
                score=float(scores[0]),
                decision=float(decisions[0]),
                params_digest=arm.digest,
                routing=("candidate" if arm is served.candidate else "control") if served.candidate else "champion",
                actor="test",
                timestamp=now,
            )
        )
    rt.ledger.record(made)
    outcomes = rt.ledger.prepare_labels(
        [LabelRequest(e.originator_id, float(label), "test", now, "test") for e, label in zip(made, y, strict=True)],
        received_at=now,
    )
    labels = [o.event for o in outcomes if o.event is not None]
    rt.ledger.record(labels)
    return made, labels


def test_replay_buffer_mixes_earlier_examples_by_a_recorded_seeded_rule(runtime: Any) -> None:
    x, y, _ = _stream(1500, seed=4)
    policy = SafetyPolicy(replay_fraction=0.25, replay_pool=200, replay_seed=7)
    spec = LearnerSpec(kind="logistic", n_features=N_FEATURES, policy=policy)
    runtime.service.register_model("m", spec, "test")
    run_simulation(runtime.service, "m", x, y)
    updates = _events(runtime, Model.UpdateApplied)
    assert all(len(e.replayed_ids) == 4 and len(e.prediction_ids) == 12 for e in updates[1:])  # 25 % of 16 rows
    earlier: set[Any] = set()
    for e in updates:
        assert set(e.replayed_ids) <= earlier  # only examples trained before
        earlier.update(e.prediction_ids)
    assert runtime.service.replayer.verify(runtime.ledger.get_model("m").id).verified


def test_envelope_and_weight_bound_reject_updates_that_leave_them(runtime: Any) -> None:
    x, y, _ = _stream(800, seed=5)
    policy = SafetyPolicy(feature_bounds=(("x0", -0.05, 0.05),), weight_bound=5.0)
    spec = LearnerSpec(kind="logistic", n_features=N_FEATURES, learning_rate=0.05, policy=policy)
    runtime.service.register_model("m", spec, "test")
    run_simulation(runtime.service, "m", x, y)
    rejected = _events(runtime, Model.UpdateRejected)
    assert rejected and all("declared envelope" in e.reason for e in rejected)
    state = runtime.service.replayer.state_at(runtime.ledger.get_model("m").id).state
    w = np.asarray(make_learner(spec).unpack(state).params["layer_0_w"])
    assert -0.05 <= w[0, 0] <= 0.05  # what serves never left the envelope
    assert runtime.service.replayer.verify(runtime.ledger.get_model("m").id).verified


def test_drift_with_rebaseline_policy_refits_and_starts_a_rollout(runtime: Any) -> None:
    # Given a model whose policy answers drift with a rebaseline
    x, y, w = _stream(6000, seed=6)
    y[3000:] = (x[3000:] @ -w > 0).astype(float)
    policy = SafetyPolicy(drift_detectors=("adwin",), drift_action="rebaseline")
    spec = LearnerSpec(kind="logistic", n_features=N_FEATURES, learning_rate=0.05, policy=policy)
    runtime.service.register_model("m", spec, "test")
    # When the concept flips
    run_simulation(runtime.service, "m", x, y)
    # Then the detection is followed, in the same commit, by a re-fit on ADWIN's window
    events = runtime.ledger.get_model_events(runtime.ledger.get_model("m").id)
    (drift,) = [e for e in events if isinstance(e, Model.DriftDetected)]
    after = events[drift.originator_version]  # versions are 1-based: this is the next event
    assert isinstance(after, Model.Rebaselined) and "adwin" in after.reason
    assert len(after.prediction_ids) >= 4 * spec.batch_size
    model = runtime.ledger.get_model("m")
    assert model.rollout is not None and model.rollout.candidate_version == after.originator_version
    # And the candidate fits the new concept better than the champion it would replace
    rng = np.random.default_rng(7)
    xt = rng.normal(size=(2000, N_FEATURES))
    yt = (xt @ -w > 0).astype(float)
    learner = make_learner(spec)
    candidate = runtime.service.replayer.state_at(model.id, model.rollout.candidate_version).state
    champion = runtime.service.replayer.state_at(model.id, model.rollout.champion_version).state
    accuracy = [float(((learner.predict(s, xt) > 0.5) == yt).mean()) for s in (candidate, champion)]
    assert accuracy[0] > accuracy[1]
    assert runtime.service.replayer.verify(model.id).verified


def test_feature_shift_is_detected_on_the_logged_features(runtime: Any) -> None:
    x, y, _ = _stream(4000, seed=8)
    x[2500:, 2] += 3.0  # one input's distribution moves; the labels do not
    policy = SafetyPolicy(drift_detectors=("features",), drift_action="alert", feature_window=250, feature_shift=1.0)
    spec = LearnerSpec(kind="logistic", n_features=N_FEATURES, policy=policy)
    runtime.service.register_model("m", spec, "test")
    run_simulation(runtime.service, "m", x, y)
    found = _events(runtime, Model.DriftDetected)
    assert found and found[0].detector == "features" and found[0].figures["feature_index"] == 2.0
    assert found[0].action == "alert" and not runtime.ledger.get_model("m").paused  # alert only
    assert 2500 <= _example_index(runtime, found[0].at_prediction) < 3000
    assert runtime.service.replayer.verify(runtime.ledger.get_model("m").id).verified
