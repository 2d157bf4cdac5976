"""Time-travel audits on real PostgreSQL: diff, counterfactual branches, taint, the model report."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any
from uuid import UUID

import numpy as np
import pytest

from domain.branch import Branch
from domain.model import Model
from domain.spec import LearnerSpec
from projections.audit_log import served_predictions
from projections.branch import run_counterfactual
from projections.diff import diff_versions
from projections.digest import state_digest
from projections.exclusion import Exclusion, by_source
from projections.impact import model_impact, tainted_versions
from projections.learners import decide_rows, make_batch, make_learner
from projections.model_report import model_report
from projections.refold import Refolder
from server.simulate import run_simulation

POISON_SPEC = LearnerSpec(kind="logistic", n_features=3, batch_size=8, optimizer="sgd", learning_rate=0.5)


def _stream(n: int, seed: int, *, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float64)
    return x, (1.0 - y if flip else y)


def _feed(rt: Any, name: str, n: int, seed: int, source: str, *, flip: bool = False) -> None:
    x, y = _stream(n, seed, flip=flip)
    run_simulation(rt.service, name, x, y, label_delays=np.zeros(n, dtype=np.int64), label_source=source)


def _poisoned(rt: Any, *, rollback: bool) -> dict[str, int]:
    """Clean labels, then a poisoned source (flipped labels), then clean; optionally a rollback."""
    rt.service.register_model("m", POISON_SPEC, "test")
    _feed(rt, "m", 160, 1, "clean")
    first_poison = rt.ledger.get_model("m").version + 1
    _feed(rt, "m", 96, 2, "poison", flip=True)
    _feed(rt, "m", 80, 3, "clean")
    marks = {"first_poison": first_poison}
    if rollback:
        marks["rollback"] = rt.service.roll_back("m", first_poison - 1, "poisoned source found", "operator").version
        _feed(rt, "m", 80, 4, "clean")
    return marks


def _manual_branch_states(rt: Any, model: Model, excluded: frozenset[UUID]) -> dict[int, Any]:
    """An independent fold from genesis without ``excluded`` (no snapshots, no refold module)."""
    learner = make_learner(model.spec)
    states: dict[int, Any] = {}
    state = learner.init()
    for event in rt.ledger.get_model_events(model.id):
        if isinstance(event, Model.UpdateApplied):
            ids = [p for p in event.prediction_ids if p not in excluded]
            if ids:
                found = rt.ledger.get_predictions(ids)
                x = np.asarray([found[p].features for p in ids])
                y = np.asarray([found[p].label for p in ids])
                state, _ = learner.update_step(state, make_batch(model.spec, x, y))
        elif isinstance(event, Model.RolledBack):
            state = states[event.to_version]
        states[event.originator_version] = state
    return states


def _positions(rt: Any) -> int:
    return int(rt.ledger.recorder.max_notification_id() or 0)


def test_diff_ranks_the_batch_that_moved_the_weights_most_first(runtime: Any) -> None:
    spec = LearnerSpec(
        kind="logistic", n_features=3, batch_size=4, optimizer="sgd", learning_rate=0.1, standardize=False
    )
    runtime.service.register_model("d", spec, "test")
    x, y = _stream(80, 7)
    x[40:44] *= 50.0  # one batch of huge inputs: its step dwarfs every other
    run_simulation(runtime.service, "d", x, y, label_delays=np.zeros(80, dtype=np.int64))
    model = runtime.ledger.get_model("d")
    huge = {r.prediction_id for r in served_predictions(runtime.ledger, model.id) if max(map(abs, r.features)) > 20}
    assert len(huge) >= 4
    [heavy] = [
        e.originator_version
        for e in runtime.ledger.get_model_events(model.id)
        if isinstance(e, Model.UpdateApplied) and huge & set(e.prediction_ids)
    ]
    result = diff_versions(runtime.ledger, runtime.service.replayer, "d", 1, model.version, top=5)
    assert result["batches"][0]["version"] == heavy
    assert result["batches"][0]["share"] > 2 * result["batches"][1]["share"]
    assert result["shares_sum"] == pytest.approx(1.0, abs=1e-6)  # the steps telescope to the total change
    assert result["digest_v2"] == model.digest
    assert result["top_weights"][0]["name"].startswith("weight x")
    pushes = result["top_batch_examples"][0]
    assert pushes["version"] == heavy
    assert {UUID(e["prediction_id"]) for e in pushes["examples"]} <= huge
    # For SGD the per-example shares add up to the batch's share (L2 is 0 here).
    assert sum(e["sgd_share"] for e in pushes["examples"]) == pytest.approx(result["batches"][0]["share"], rel=1e-3)


def test_counterfactual_excluding_nothing_reproduces_every_real_digest(runtime: Any) -> None:
    _poisoned(runtime, rollback=True)
    model = runtime.ledger.get_model("m")
    refolder = Refolder(runtime.ledger, runtime.service.replayer, model)
    for step in refolder.run(1, exclude=frozenset()):
        recorded = getattr(step.event, "digest", None)
        if recorded is not None:
            assert state_digest(step.state) == recorded, step.version
    for start in (1, 7, model.version - 3):
        result = run_counterfactual(
            runtime.ledger,
            runtime.service.replayer,
            "m",
            Exclusion("nothing", frozenset()),
            from_version=start,
            actor="t",
        )
        assert result.branch_digest == result.real_digest == model.digest
        assert result.first_divergent_version is None
        assert result.flipped == 0 and result.weight_change_norm == 0.0
        assert result.real == result.branch


def test_excluding_a_poisoned_source_changes_weights_flips_the_right_decisions_and_writes_only_branch_events(
    runtime: Any,
) -> None:
    marks = _poisoned(runtime, rollback=False)
    model = runtime.ledger.get_model("m")
    exclusion = by_source(runtime.ledger, "poison", model.id, "m")
    assert len(exclusion.ids) == 96
    before = _positions(runtime)
    result = run_counterfactual(runtime.ledger, runtime.service.replayer, "m", exclusion, actor="auditor")
    assert result.first_divergent_version == marks["first_poison"]
    assert result.batches_skipped == 12 and result.rows_dropped == 96
    assert result.weight_change_norm > 0.1 and result.branch_digest != model.digest
    # The branch never learned the flipped labels: it judges the clean labels better.
    mine, real = result.branch, result.real
    assert mine.accuracy is not None and real.accuracy is not None and mine.loss is not None and real.loss
    assert mine.accuracy > real.accuracy and mine.loss < real.loss
    # Which decisions flip, checked against an independent fold without the poison.
    states = _manual_branch_states(runtime, model, exclusion.ids)
    learner = make_learner(model.spec)
    expected: set[str] = set()
    for row in served_predictions(runtime.ledger, model.id):
        _, decision = decide_rows(model.spec, learner.predict_proba(states[row.version], np.asarray([row.features])))
        if decision[0] != row.decision:
            expected.add(str(row.prediction_id))
    assert {f.prediction_id for f in result.flips} == expected and result.flipped == len(expected) > 0
    assert all(f.version >= marks["first_poison"] for f in result.flips)
    assert result.flipped_to_correct > result.flipped_to_wrong
    # Only the branch's own events were written; the model did not change.
    rows = runtime.ledger.recorder.select_notifications(before + 1, 100)
    assert [n.topic for n in rows] == ["domain.branch:Branch.Created", "domain.branch:Branch.Replayed"]
    assert runtime.ledger.get_model("m").version == model.version
    branch: Branch = runtime.ledger.repository.get(UUID(result.branch_id))
    assert branch.model_id == model.id and branch.final_digest == result.branch_digest
    # A second run of the same exclusion appends one more replay to the same branch.
    again = run_counterfactual(runtime.ledger, runtime.service.replayer, "m", exclusion, actor="auditor")
    assert again.branch_id == result.branch_id and again.branch_digest == result.branch_digest
    assert [n.topic for n in runtime.ledger.recorder.select_notifications(before + 3, 100)] == [
        "domain.branch:Branch.Replayed"
    ]


def test_impact_taints_exactly_the_versions_after_the_first_poisoned_batch_until_a_rollback(runtime: Any) -> None:
    marks = _poisoned(runtime, rollback=True)
    model = runtime.ledger.get_model("m")
    exclusion = by_source(runtime.ledger, "poison", model.id, "m")
    impact = model_impact(runtime.ledger, model, exclusion.ids)
    expected = list(range(marks["first_poison"], marks["rollback"]))
    assert impact.tainted_versions == expected
    assert impact.tainted_ranges == [(marks["first_poison"], marks["rollback"] - 1)]
    assert impact.cleared_by_rollbacks == [marks["rollback"]] and not impact.head_tainted
    assert impact.examples_learned == 96 and len(impact.tainted_updates) == 12
    served = served_predictions(runtime.ledger, model.id)
    affected = [r for r in served if r.version in set(expected)]
    assert impact.predictions == len(affected) > 0
    assert impact.prediction_ids == [str(r.prediction_id) for r in affected]
    assert impact.first_prediction == affected[0].time.isoformat()
    # A rollback to a tainted version keeps the taint.
    still = runtime.service.roll_back("m", marks["first_poison"] + 1, "test", "operator").version
    events = runtime.ledger.get_model_events(model.id)
    assert tainted_versions(events, exclusion.ids)[still] is True


def test_the_report_counts_predictions_per_version(runtime: Any) -> None:
    marks = _poisoned(runtime, rollback=True)
    model = runtime.ledger.get_model("m")
    runtime.service.pause("m", "audit", "operator")
    served = served_predictions(runtime.ledger, model.id)
    start, end = served[0].time - timedelta(seconds=1), served[-1].time + timedelta(hours=1)
    report = model_report(runtime.ledger, runtime.service.replayer, "m", start, end)
    rows = {r["version"]: r for r in report["versions"]}
    counts = Counter(r.version for r in served)
    assert {v: r["predictions"] for v, r in rows.items() if r["predictions"]} == dict(counts)
    assert report["summary"]["predictions"] == len(served)
    assert report["summary"]["rollbacks"] == 1 and report["summary"]["pauses"] == 1
    [rollback] = [o for o in report["operations"] if o["kind"] == "rollback"]
    assert rollback["actor"] == "operator" and rollback["to_version"] == marks["first_poison"] - 1
    assert rollback["reason"] == "poisoned source found"
    assert rows[marks["rollback"]]["update_norm"] > 0  # the jump back is a change too
    assert report["envelope"]["declared"] is None and "issue 5" in report["envelope"]["note"]
    assert report["envelope"]["max_update_norm"] == max(r["update_norm"] or 0 for r in report["versions"])
    # A later window: only the predictions made in it.
    middle = sorted({r.time for r in served})[len({r.time for r in served}) // 2]
    later = model_report(runtime.ledger, runtime.service.replayer, "m", middle, end)
    assert later["summary"]["predictions"] == sum(1 for r in served if r.time >= middle)
    empty = model_report(
        runtime.ledger, runtime.service.replayer, "m", start - timedelta(days=2), start - timedelta(days=1)
    )
    assert empty["summary"]["predictions"] == 0 and empty["versions"] == []
