"""Unit tests for the JAX online learners and their state digest and serialisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.spec import LearnerSpec
from projections.digest import stacked_digests, state_digest, state_from_bytes, state_leaves, state_to_bytes
from projections.learners import Learner, LearnerState, decide, make_batch, make_learner

ROOT = Path(__file__).resolve().parents[2]

# Every kind/head and every optimizer at least once; l2 and standardize both ways.
SPECS: dict[str, LearnerSpec] = {
    "logistic-adam": LearnerSpec(kind="logistic", n_features=4, optimizer="adam", batch_size=8),
    "softmax-sgd": LearnerSpec(kind="softmax", n_features=4, n_classes=3, optimizer="sgd", batch_size=8, l2=0.01),
    "linear-adagrad": LearnerSpec(kind="linear", n_features=4, optimizer="adagrad", batch_size=8, standardize=False),
    "mlp-binary-adam": LearnerSpec(
        kind="mlp", head="binary", n_features=4, hidden=(8,), batch_size=8, seed=3, l2=0.001
    ),
    "mlp-multiclass-adagrad": LearnerSpec(
        kind="mlp",
        head="multiclass",
        n_features=4,
        n_classes=3,
        hidden=(8, 4),
        optimizer="adagrad",
        batch_size=8,
        seed=5,
    ),
    "mlp-regression-sgd": LearnerSpec(
        kind="mlp",
        head="regression",
        n_features=4,
        hidden=(6,),
        optimizer="sgd",
        batch_size=8,
        seed=7,
        standardize=False,
    ),
}


def _labels(spec: LearnerSpec, x: np.ndarray) -> np.ndarray:
    if spec.head == "binary":
        return (x[:, 0] + x[:, 1] > 0).astype(np.float64)
    if spec.head == "multiclass":
        return np.argmax(x[:, : spec.n_classes], axis=1).astype(np.float64)
    return x @ np.arange(1.0, spec.n_features + 1.0) + 0.5


def _stream(spec: LearnerSpec, n_batches: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of varying size (partial batches included), shifted and scaled features."""
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        k = int(rng.integers(1, spec.batch_size + 1))
        x = rng.normal(loc=2.0, scale=3.0, size=(k, spec.n_features))
        yield x, _labels(spec, x)


def _run(learner: Learner, batches: list[tuple[np.ndarray, np.ndarray]]) -> LearnerState:
    state = learner.init()
    for x, y in batches:
        state, _ = learner.update_step(state, make_batch(learner.spec, x, y))
    return state


# Every optimizer, a linear and two MLP heads: enough for the cross-process check
# while keeping the fresh interpreter's compile bill small.
FRESH_PROCESS_SPECS = ("logistic-adam", "mlp-multiclass-adagrad", "mlp-regression-sgd")


def _digests() -> dict[str, str]:
    """Digest of some specs after a fixed stream; also run in a fresh interpreter."""
    return {
        name: state_digest(_run(make_learner(SPECS[name]), list(_stream(SPECS[name], 12))))
        for name in FRESH_PROCESS_SPECS
    }


def _accuracy(learner: Learner, state: LearnerState, x: np.ndarray, y: np.ndarray) -> float:
    proba = learner.predict_proba(state, x)
    decisions = np.array([decide(learner.spec, row)[1] for row in proba])
    return float(np.mean(decisions == y))


@pytest.mark.parametrize("name", list(SPECS))
def test_same_batches_give_identical_state(name: str) -> None:
    spec = SPECS[name]
    batches = list(_stream(spec, 12))
    # A freshly compiled learner is covered by test_fresh_process_gives_same_digests.
    first = _run(make_learner(spec), batches)
    second = _run(make_learner(spec), batches)
    assert state_digest(first) == state_digest(second)
    assert state_to_bytes(first) == state_to_bytes(second)
    assert int(first.step) == 12
    assert all(np.isfinite(leaf).all() for leaf in state_leaves(first))


def test_fresh_process_gives_same_digests() -> None:
    code = (
        "import importlib.util, json, sys\n"
        f"m = importlib.util.spec_from_file_location('tl', {str(Path(__file__))!r})\n"
        "mod = importlib.util.module_from_spec(m); m.loader.exec_module(mod)\n"
        "print(json.dumps(mod._digests()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == _digests()


def test_initial_state_depends_only_on_spec() -> None:
    mlp = SPECS["mlp-binary-adam"]
    assert state_digest(make_learner(mlp).init()) == state_digest(make_learner(mlp).init())
    other_seed = mlp.with_changes(seed=mlp.seed + 1)
    assert state_digest(make_learner(other_seed).init()) != state_digest(make_learner(mlp).init())
    logistic = make_learner(SPECS["logistic-adam"])
    params = logistic.unpack(logistic.init()).params
    assert sorted(params) == ["layer_0_b", "layer_0_w"]
    assert all(not np.asarray(v).any() for v in params.values())


@pytest.mark.parametrize("name", ["logistic-adam", "mlp-multiclass-adagrad", "linear-adagrad"])
def test_padding_rows_have_no_effect(name: str) -> None:
    spec = SPECS[name]
    learner = make_learner(spec)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, spec.n_features))
    clean = make_batch(spec, x, _labels(spec, x))
    garbage_x = np.asarray(clean.x).copy()
    garbage_y = np.asarray(clean.y).copy()
    garbage_x[5:] = rng.normal(scale=1e6, size=(spec.batch_size - 5, spec.n_features))
    garbage_x[6] = np.nan
    garbage_y[5:] = 7.0
    dirty = clean._replace(x=jax.numpy.asarray(garbage_x), y=jax.numpy.asarray(garbage_y))
    state = _run(learner, list(_stream(spec, 3)))
    after_clean, metrics = learner.update_step(state, clean)
    after_dirty, _ = learner.update_step(state, dirty)
    assert state_digest(after_clean) == state_digest(after_dirty)
    assert float(metrics["n"]) == 5.0


def test_padded_batch_matches_unpadded_batch() -> None:
    # Different batch shapes reduce in a different order, so equal up to rounding only.
    spec = SPECS["logistic-adam"]
    exact = spec.with_changes(batch_size=5)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, spec.n_features))
    y = _labels(spec, x)
    padded = _run(make_learner(spec), [(x, y)] * 3)
    unpadded = _run(make_learner(exact), [(x, y)] * 3)
    for a, b in zip(state_leaves(padded), state_leaves(unpadded), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_update_step_compiles_once() -> None:
    # A spec shared with other tests: its step must still have one compiled entry however
    # many batch sizes, restored states and earlier tests it has seen.
    spec = SPECS["mlp-binary-adam"]
    learner = make_learner(spec)
    state = learner.init()
    for x, y in _stream(spec, 6):
        state, _ = learner.update_step(state, make_batch(spec, x, y))
    restored = state_from_bytes(learner.init(), state_to_bytes(state))
    learner.update_step(restored, make_batch(spec, np.zeros((1, 4)), np.ones(1)))
    assert learner.update_step._cache_size() == 1  # type: ignore[attr-defined]


def test_scaler_tracks_mean_and_variance_of_real_rows() -> None:
    spec = SPECS["logistic-adam"]
    batches = list(_stream(spec, 20, seed=4))
    learner = make_learner(spec)
    scaler = learner.unpack(_run(learner, batches)).scaler
    rows = np.concatenate([x for x, _ in batches])
    assert float(scaler.count) == rows.shape[0]
    np.testing.assert_allclose(scaler.mean, rows.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(scaler.m2) / rows.shape[0], rows.var(axis=0), rtol=1e-4)
    linear = make_learner(SPECS["linear-adagrad"])
    unscaled = linear.unpack(_run(linear, list(_stream(SPECS["linear-adagrad"], 3))))
    assert float(unscaled.scaler.count) == 0.0


@pytest.mark.parametrize("name", list(SPECS))
def test_predictions_have_the_contracted_shapes(name: str) -> None:
    spec = SPECS[name]
    learner = make_learner(spec)
    batches = list(_stream(spec, 5))
    state = learner.init()
    for x, y in batches:
        state, metrics = learner.update_step(state, make_batch(spec, x, y))
    x, y = batches[-1]
    # The state's scaler is the one the step used, so loss_after is reproducible.
    np.testing.assert_allclose(learner.losses(state, x, y).mean(), float(metrics["loss_after"]), rtol=1e-4, atol=1e-6)
    for n in (0, 1, 5, 9):
        rows = np.random.default_rng(n).normal(size=(n, spec.n_features))
        proba = learner.predict_proba(state, rows)
        scores = learner.predict(state, rows)
        assert proba.shape == (n, spec.n_outputs) and proba.dtype == np.float64
        assert scores.shape == (n,) and scores.dtype == np.float64
        assert learner.losses(state, rows, _labels(spec, rows)).shape == (n,)
        if spec.head == "multiclass":
            np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
            np.testing.assert_array_equal(scores, proba.max(axis=1))
        else:
            np.testing.assert_array_equal(scores, proba[:, 0])
        if spec.head == "binary":
            assert ((proba >= 0) & (proba <= 1)).all()
    with pytest.raises(ValueError):
        learner.predict(state, np.zeros((2, spec.n_features + 1)))


def test_strict_dtype_promotion() -> None:
    # optax's adam promotes int/float internally, so an adagrad MLP (our code end to end,
    # softmax head included) is what runs strict.
    spec = SPECS["mlp-multiclass-adagrad"]
    learner = make_learner(spec)
    with jax.numpy_dtype_promotion("strict"):
        state = _run(learner, list(_stream(spec, 2)))
        learner.predict(state, np.ones((3, spec.n_features)))


def test_logistic_learns_a_separable_stream() -> None:
    spec = LearnerSpec(kind="logistic", n_features=5, learning_rate=0.05, batch_size=16)
    rng = np.random.default_rng(10)
    w = rng.normal(size=5)
    x = rng.normal(loc=1.0, scale=2.0, size=(16 * 150 + 500, 5))
    y = (x @ w > w.sum()).astype(np.float64)
    learner = make_learner(spec)
    state = _run(learner, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 16 * 150, 16)])
    assert _accuracy(learner, state, x[-500:], y[-500:]) > 0.9


def test_linear_regression_reduces_loss() -> None:
    spec = LearnerSpec(kind="linear", n_features=4, optimizer="sgd", learning_rate=0.05, batch_size=16)
    learner = make_learner(spec)
    held_x, held_y = next(_stream(spec.with_changes(batch_size=200), 1, seed=99))
    before = learner.losses(learner.init(), held_x, held_y).mean()
    state = _run(learner, list(_stream(spec, 200, seed=11)))
    assert learner.losses(state, held_x, held_y).mean() < 0.01 * before


def test_mlp_beats_logistic_on_xor() -> None:
    rng = np.random.default_rng(12)
    x = rng.uniform(-1.0, 1.0, size=(32 * 200 + 500, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(np.float64)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 32 * 200, 32)]
    mlp = make_learner(LearnerSpec(kind="mlp", n_features=2, hidden=(16,), learning_rate=0.03, batch_size=32))
    logistic = make_learner(LearnerSpec(kind="logistic", n_features=2, batch_size=32))
    mlp_acc = _accuracy(mlp, _run(mlp, batches), x[-500:], y[-500:])
    logistic_acc = _accuracy(logistic, _run(logistic, batches), x[-500:], y[-500:])
    assert mlp_acc > 0.9
    assert mlp_acc > logistic_acc + 0.2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(SPECS)),
    sizes=st.lists(st.integers(min_value=1, max_value=8), max_size=6),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_serialisation_round_trip(name: str, sizes: list[int], seed: int) -> None:
    spec = SPECS[name]
    learner = make_learner(spec)
    rng = np.random.default_rng(seed)
    batches = [(x := rng.normal(size=(k, spec.n_features)), _labels(spec, x)) for k in sizes]
    state = _run(learner, batches)
    blob = state_to_bytes(state)
    restored = state_from_bytes(learner.init(), blob)
    assert state_digest(restored) == state_digest(state)
    assert state_to_bytes(restored) == blob
    nxt = make_batch(spec, *next(_stream(spec, 1, seed=seed)))
    assert state_digest(learner.update_step(restored, nxt)[0]) == state_digest(learner.update_step(state, nxt)[0])


def test_state_from_bytes_rejects_other_specs_and_damage() -> None:
    spec = SPECS["logistic-adam"]
    blob = state_to_bytes(_run(make_learner(spec), list(_stream(spec, 2))))
    for other in (
        LearnerSpec(kind="logistic", n_features=5, batch_size=8),
        spec.with_changes(optimizer="sgd"),
        SPECS["mlp-binary-adam"],
    ):
        with pytest.raises(ValueError, match="different learner spec"):
            state_from_bytes(make_learner(other).init(), blob)
    template = make_learner(spec).init()
    corrupted = bytearray(blob)
    corrupted[-1] ^= 0x01
    for bad in (b"", b"garbage" * 4, blob[: len(blob) // 2], bytes(corrupted)):
        with pytest.raises(ValueError):
            state_from_bytes(template, bad)


def test_decide_per_head() -> None:
    binary = SPECS["logistic-adam"].with_changes(threshold=0.7)
    assert decide(binary, np.array([0.7])) == (pytest.approx(0.7), 1.0)
    assert decide(binary, np.array([0.69])) == (pytest.approx(0.69), 0.0)
    multi = SPECS["softmax-sgd"]
    assert decide(multi, np.array([0.2, 0.5, 0.3])) == (0.5, 1.0)
    assert decide(SPECS["linear-adagrad"], np.array([-2.5])) == (-2.5, -2.5)
    with pytest.raises(ValueError):
        decide(multi, np.array([0.5, 0.5]))


def test_make_batch_pads_and_validates() -> None:
    spec = SPECS["softmax-sgd"]
    batch = make_batch(spec, np.ones((3, 4)), np.array([0.0, 2.0, 1.0]))
    assert batch.x.shape == (8, 4) and batch.x.dtype == np.float32
    np.testing.assert_array_equal(batch.mask, [1, 1, 1, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="at most 8 rows"):
        make_batch(spec, np.ones((9, 4)), np.zeros(9))
    for x, y in (
        (np.ones((2, 3)), np.zeros(2)),  # wrong feature count
        (np.ones((2, 4)), np.zeros(3)),  # y length differs
        (np.ones((2, 4)), np.array([0.0, 3.0])),  # class out of range
        (np.ones((2, 4)), np.array([0.0, 0.5])),  # not a class index
        (np.full((2, 4), np.nan), np.zeros(2)),  # non-finite
    ):
        with pytest.raises(ValueError):
            make_batch(spec, x, y)
    with pytest.raises(ValueError, match="0 or 1"):
        make_batch(SPECS["logistic-adam"], np.ones((1, 4)), np.array([2.0]))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_packing_is_exact_and_reversible(name: str) -> None:
    learner = make_learner(SPECS[name])
    state = _run(learner, list(_stream(SPECS[name], 3, seed=2)))
    again = learner.pack(learner.unpack(state))
    assert state_digest(again) == state_digest(state)
    assert len(jax.tree_util.tree_leaves(state)) == 3


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.integers(min_value=1, max_value=5), seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_stacked_digests_equal_state_digest_of_each_state(name: str, steps: int, seed: int) -> None:
    # Given the states after each of a few update steps, stacked leaf by leaf as a scan returns them
    spec = SPECS[name]
    learner = make_learner(spec)
    state = learner.init()
    states = []
    for x, y in _stream(spec, steps, seed):
        state, _ = learner.update_step(state, make_batch(spec, x, y))
        states.append(state)
    stacked = [np.stack(column) for column in zip(*(state_leaves(s) for s in states), strict=True)]
    # When their digests are taken together
    digests = stacked_digests(stacked)
    # Then each is the digest of that state alone
    assert digests == [state_digest(s) for s in states]


def test_stacked_digests_frame_empty_and_scalar_leaves_like_state_digest() -> None:
    # Given states with a 0-d leaf and an empty leaf
    states = [LearnerState(np.int32(k), np.zeros(0, np.int32), np.arange(3, dtype=np.float32) * k) for k in range(4)]  # type: ignore[arg-type]
    stacked = [np.stack(column) for column in zip(*(state_leaves(s) for s in states), strict=True)]
    # Then the stacked digests are state_digest's, and a different state differs
    assert stacked_digests(stacked) == [state_digest(s) for s in states]
    assert len(set(stacked_digests(stacked))) == 4
    assert stacked_digests([np.zeros((0, 2), np.float32)]) == []
