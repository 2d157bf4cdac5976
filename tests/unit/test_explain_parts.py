"""Pure parts of explanations: the lineage fold, the accuracy bins, the public logits function."""

from __future__ import annotations

from uuid import UUID, uuid4

import jax.numpy as jnp
import numpy as np

from domain.model import Model
from domain.spec import LearnerSpec
from projections.learners import decide_rows, logits_fn, make_batch, make_learner
from projections.lineage import learned_from, lineage_at, rollbacks_affecting
from projections.performance import _bin

SPEC = LearnerSpec(kind="logistic", n_features=3, batch_size=2)


def given_history() -> tuple[list[object], list[tuple[UUID, UUID]]]:
    """v1 registered, v2-v5 updates, v6 rolled back to v3, v7 rejected, v8 update."""
    model = Model(name="m", spec=SPEC, platform=(("backend", "cpu"),), initial_digest="sha256:0", actor="alice")
    batches = [(uuid4(), uuid4()) for _ in range(6)]
    for i, ids in enumerate(batches[:4], start=2):
        model.apply_update(ids, i - 1, 0.7, 0.6, f"sha256:{i}", "learner")
    model.roll_back(3, "sha256:3", "bad labels", "bob")
    model.reject_update(batches[4], "non-finite parameters after the step", 0.7, float("nan"), "learner")
    model.apply_update(batches[5], 3, 0.7, 0.6, "sha256:8", "learner")
    return list(model.collect_events()), batches


def test_a_rollback_prunes_the_lineage_to_the_target() -> None:
    events, _ = given_history()
    before = lineage_at(events, 5)
    assert (before.updates, before.update_ranges, before.labeled_examples) == (4, ((2, 5),), 8)
    rolled = lineage_at(events, 6)
    target = lineage_at(events, 3)
    assert (rolled.updates, rolled.update_ranges) == (2, ((2, 3),))
    assert rolled.examples_digest == target.examples_digest != before.examples_digest
    assert rolled.rollbacks == 1 and "rollback to version 3" in rolled.created_by
    head = lineage_at(events, 8)
    assert head.update_ranges == ((2, 3), (8, 8)) and head.updates == 3
    assert head.updates_applied == 5 and head.updates_rejected == 1
    rejected = lineage_at(events, 7).last_gate
    assert rejected is not None and rejected.verdict == "rejected" and rejected.version == 7


def test_afterwards_facts_follow_the_rollback() -> None:
    events, batches = given_history()
    assert [r.version for r in rollbacks_affecting(events, 4)] == [6]
    assert rollbacks_affecting(events, 3) == ()  # the target itself was not abandoned
    abandoned = learned_from(events, batches[2][0])
    assert (abandoned.applied_in_version, abandoned.still_in_head_lineage) == (4, False)
    kept = learned_from(events, batches[0][1])
    assert (kept.applied_in_version, kept.still_in_head_lineage) == (2, True)
    rejected = learned_from(events, batches[4][0])
    assert (rejected.applied_in_version, rejected.rejected_in_versions) == (None, (7,))


def test_bins_never_exceed_the_limit_and_keep_every_labeled_prediction() -> None:
    rng = np.random.default_rng(0)
    per_version = {v: list(rng.integers(0, 2, rng.integers(1, 9)).astype(float)) for v in range(1, 400)}
    for limit in (1, 7, 50, 1000):
        points = _bin(per_version, limit)
        assert 1 <= len(points) <= limit
        assert sum(p.labeled for p in points) == sum(len(v) for v in per_version.values())
        overall = np.mean([e for v in per_version.values() for e in v])
        assert np.isclose(sum(p.value * p.labeled for p in points) / sum(p.labeled for p in points), overall)


def test_logits_fn_is_what_predict_proba_links() -> None:
    learner = make_learner(SPEC)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3)) * [1.0, 10.0, 100.0]
    state = learner.init()
    for i in range(0, 16, 2):
        state, _ = learner.update_step(state, make_batch(SPEC, x[i : i + 2], (x[i : i + 2, 0] > 0).astype(float)))
    proba = learner.predict_proba(state, x)
    for row, p in zip(x, proba, strict=True):
        logit = np.asarray(logits_fn(SPEC)(state, jnp.asarray(row, jnp.float32)))
        assert abs(float(1 / (1 + np.exp(-logit[0]))) - p[0]) < 2e-7
    assert decide_rows(SPEC, proba)[0].shape == (16,)
