"""Online learners as pure JAX/optax functions: one jitted update step per learner spec."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from domain.spec import LearnerSpec

Params = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

_VAR_EPS = 1e-8
_MIN_BUCKET = 8
# Pinned rather than read from jax's config so that a global ``jax_default_prng_impl``
# change cannot silently change every MLP's initial weights (and so every digest).
_PRNG_IMPL = "threefry2x32"


class ScalerState(NamedTuple):
    """Running per-feature mean and sum of squared deviations of the unmasked rows seen."""

    # Shadows tuple.count(); the field name is part of the shared contract.
    count: jax.Array  # type: ignore[assignment]
    mean: jax.Array
    m2: jax.Array


class StructuredState(NamedTuple):
    """A learner's state with its structure: parameters, optimizer state, scaler."""

    step: jax.Array
    params: Any
    opt_state: Any
    scaler: ScalerState


class LearnerState(NamedTuple):
    """The folded state of a learner, packed into three arrays.

    Every float leaf of the structured state (parameters, optimizer moments, scaler) is
    concatenated into ``floats`` and every integer leaf (optimizer counters) into
    ``ints``, in a fixed order set by the spec. A jitted call costs ~15 µs per array
    argument or result on this CPU, so an 11-leaf state made every step ~250 µs of pure
    dispatch; three leaves cost ~60. ``Learner.unpack`` gives the structure back.
    """

    step: jax.Array  # int32 scalar: update steps taken
    ints: jax.Array  # int32 [k]
    floats: jax.Array  # float32 [m]


class Batch(NamedTuple):
    """A fixed-size batch; rows with ``mask == 0`` are padding and have no effect."""

    x: jax.Array
    y: jax.Array
    mask: jax.Array


@dataclass(frozen=True)
class Learner:
    """The pure functions of one learner spec; build with ``make_learner``."""

    spec: LearnerSpec
    init: Callable[[], LearnerState]
    update_step: Callable[[LearnerState, Batch], tuple[LearnerState, Metrics]]
    predict: Callable[[LearnerState, np.ndarray], np.ndarray]
    predict_proba: Callable[[LearnerState, np.ndarray], np.ndarray]
    losses: Callable[[LearnerState, np.ndarray, np.ndarray], np.ndarray]
    unpack: Callable[[LearnerState], StructuredState]
    pack: Callable[[StructuredState], LearnerState]


@functools.lru_cache(maxsize=256)
def make_learner(spec: LearnerSpec) -> Learner:
    """Build the learner for a spec; cached so each spec's functions are compiled once.

    Linear kinds (``logistic``, ``softmax``, ``linear``) start at zero weights. An
    ``mlp`` uses tanh hidden layers (smooth, zero-centred, so no dead units on small
    online batches) with Glorot-normal weights drawn from ``spec.seed`` (threefry) and zero biases.
    Parameters live in a dict with keys ``layer_{i}_w`` [fan_in, fan_out] and
    ``layer_{i}_b`` [fan_out]; at most 9 layers, so the keys sort in layer order.

    Args:
        spec: the learner specification (hashable, frozen).

    Returns:
        A ``Learner`` whose ``update_step`` is a single jitted pure function.
    """
    tx = _make_optimizer(spec)
    pack, unpack = _make_packing(spec, tx)

    def loss_fn(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        data_loss = _masked_mean(example_losses(spec, _forward(spec, params, x), y), mask)
        return data_loss + _l2_penalty(spec, params), data_loss

    @functools.cache  # arrays are immutable, so every caller can share one initial state
    @jax.jit
    def init() -> LearnerState:
        return pack(_init_structured(spec, tx))

    @jax.jit
    def update_step(packed: LearnerState, batch: Batch) -> tuple[LearnerState, Metrics]:
        state = unpack(packed)
        mask = batch.mask.astype(jnp.float32)
        real = mask > 0
        # Zero the padding first: whatever garbage (even NaN) sits in padding rows then
        # cannot reach the sums, nor the gradients through 0 * NaN in the backward pass.
        x = jnp.where(real[:, None], batch.x.astype(jnp.float32), 0.0)
        y = jnp.where(real, batch.y.astype(jnp.float32), 0.0)
        scaler = state.scaler
        if spec.standardize:
            scaler = _scaler_update(scaler, x, mask)
            x = jnp.where(real[:, None], _standardise(scaler, x), 0.0)
        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x, y, mask)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss_after = _masked_mean(example_losses(spec, _forward(spec, params, x), y), mask)
        new_state = pack(StructuredState(state.step + 1, params, opt_state, scaler))
        finite = jnp.all(jnp.isfinite(new_state.floats))
        n = jnp.sum(mask)
        # One packed summary: the live learner reads it with a single host transfer.
        summary = jnp.stack([loss, loss_after, n, finite.astype(jnp.float32)])
        return new_state, {"loss": loss, "loss_after": loss_after, "n": n, "summary": summary}

    # One jitted evaluation serves predict, predict_proba and losses: a third of the
    # compiles per bucket, for a loss computation that costs next to nothing.
    @jax.jit
    def evaluate(packed: LearnerState, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        state = unpack(packed)
        logits = _forward(spec, state.params, _standardise(state.scaler, x) if spec.standardize else x)
        return _outputs(spec, logits), example_losses(spec, logits, y)

    def predict_proba(state: LearnerState, x: np.ndarray) -> np.ndarray:
        xp, n = _pad_rows(spec, x)
        proba, _ = evaluate(state, xp, _zeros(xp.shape[0]))
        return np.asarray(proba)[:n].astype(np.float64)

    def predict(state: LearnerState, x: np.ndarray) -> np.ndarray:
        proba = predict_proba(state, x)
        return proba.max(axis=1) if spec.head == "multiclass" else proba[:, 0]

    def losses(state: LearnerState, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        xp, n = _pad_rows(spec, x)
        ya = np.asarray(y, dtype=np.float32)
        if ya.shape != (n,):
            raise ValueError(f"y must have shape ({n},), got {ya.shape}")
        yp = np.zeros((xp.shape[0],), np.float32)
        yp[:n] = ya
        _, per_row = evaluate(state, xp, yp)
        return np.asarray(per_row)[:n].astype(np.float64)

    return Learner(spec, init, update_step, predict, predict_proba, losses, unpack, pack)


@functools.lru_cache(maxsize=256)
def logits_fn(spec: LearnerSpec) -> Callable[[LearnerState, jax.Array], jax.Array]:
    """The model's raw output for one feature row: standardise (if the spec does), then forward.

    The same float32 operations ``predict_proba`` applies before its link function, for
    a single row, jitted and differentiable: explanations decompose it exactly (linear
    kinds) or integrate its gradient (``jax.grad``, for MLPs). Serving never calls it.

    Args:
        spec: the learner specification.

    Returns:
        ``logits(state, x)``: packed state and raw features [n_features] in, the
        [n_outputs] logits (binary: log-odds; multiclass: class logits; regression:
        the prediction) out.
    """
    unpack = make_learner(spec).unpack

    @jax.jit
    def logits(packed: LearnerState, x: jax.Array) -> jax.Array:
        state = unpack(packed)
        row = jnp.asarray(x, jnp.float32)[None, :]
        z = _standardise(state.scaler, row) if spec.standardize else row
        return _forward(spec, state.params, z)[0]

    return logits


def make_batch(spec: LearnerSpec, x: np.ndarray, y: np.ndarray) -> Batch:
    """Pad labeled rows to exactly ``spec.batch_size`` rows, masking the padding out.

    Args:
        spec: the learner specification.
        x: features [k, n_features] with k <= batch_size.
        y: targets [k]: 0/1 (binary), class index (multiclass) or a number (regression).

    Returns:
        A float32 ``Batch`` of ``batch_size`` rows, ``mask`` 1.0 on the k real rows.

    Raises:
        ValueError: on wrong shapes, more rows than ``batch_size``, non-finite values
            (after the cast to float32) or labels outside the head's label set.
    """
    xa = np.asarray(x, dtype=np.float32)
    ya = np.asarray(y, dtype=np.float32)
    if xa.ndim != 2 or xa.shape[1] != spec.n_features:
        raise ValueError(f"x must have shape (k, {spec.n_features}), got {xa.shape}")
    k = xa.shape[0]
    if ya.shape != (k,):
        raise ValueError(f"y must have shape ({k},), got {ya.shape}")
    if k > spec.batch_size:
        raise ValueError(f"a batch holds at most {spec.batch_size} rows, got {k}")
    # One NaN in a folded state poisons every later version, so refuse it at the door.
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise ValueError("x and y must be finite float32 values")
    if spec.head == "binary" and not ((ya == 0.0) | (ya == 1.0)).all():
        raise ValueError("binary labels must be 0 or 1")
    if spec.head == "multiclass" and not (
        (ya == np.round(ya)).all() and (ya >= 0).all() and (ya < spec.n_classes).all()
    ):
        raise ValueError(f"multiclass labels must be integers in [0, {spec.n_classes})")
    xb = np.zeros((spec.batch_size, spec.n_features), np.float32)
    yb = np.zeros((spec.batch_size,), np.float32)
    mb = np.zeros((spec.batch_size,), np.float32)
    xb[:k], yb[:k], mb[:k] = xa, ya, 1.0
    # numpy arrays go straight into the jitted step: same abstract signature as device
    # arrays (so the same compiled step), without a separate dispatch to move them.
    return Batch(xb, yb, mb)  # type: ignore[arg-type]


def decide(spec: LearnerSpec, proba_row: np.ndarray) -> tuple[float, float]:
    """Turn one row of ``predict_proba`` into a (score, decision) pair.

    Args:
        spec: the learner specification.
        proba_row: [n_outputs] probabilities (or the regression prediction).

    Returns:
        Binary: (P(y=1), 1.0 if P(y=1) >= threshold else 0.0); multiclass: (max
        probability, argmax as float); regression: (prediction, prediction).
    """
    row = np.asarray(proba_row, dtype=np.float64).reshape(-1)
    if row.shape != (spec.n_outputs,):
        raise ValueError(f"proba_row must have {spec.n_outputs} values, got {row.shape[0]}")
    if spec.head == "binary":
        p1 = float(row[0])
        return p1, 1.0 if p1 >= spec.threshold else 0.0
    if spec.head == "multiclass":
        idx = int(np.argmax(row))  # ties go to the lowest class index
        return float(row[idx]), float(idx)
    yhat = float(row[0])
    return yhat, yhat


def _init_structured(spec: LearnerSpec, tx: optax.GradientTransformation) -> StructuredState:
    params = _init_params(spec)
    zeros = jnp.zeros((spec.n_features,), jnp.float32)
    scaler = ScalerState(jnp.zeros((), jnp.float32), zeros, zeros)
    return StructuredState(jnp.zeros((), jnp.int32), params, tx.init(params), scaler)


def _make_packing(
    spec: LearnerSpec, tx: optax.GradientTransformation
) -> tuple[Callable[[StructuredState], LearnerState], Callable[[LearnerState], StructuredState]]:
    """Exact, order-fixed maps between the structured state and its three packed arrays.

    Only slicing, reshaping and concatenation: no arithmetic, so packing changes no bit.
    """
    template = jax.eval_shape(lambda: _init_structured(spec, tx))
    leaves, treedef = jax.tree_util.tree_flatten((template.params, template.opt_state, template.scaler))
    kinds = ["f" if jnp.issubdtype(leaf.dtype, jnp.floating) else "i" for leaf in leaves]
    for leaf, kind in zip(leaves, kinds, strict=True):
        if (kind == "f" and leaf.dtype != jnp.float32) or (kind == "i" and leaf.dtype != jnp.int32):
            raise TypeError(f"cannot pack a state leaf of dtype {leaf.dtype}")
    sizes = [int(np.prod(leaf.shape, dtype=np.int64)) for leaf in leaves]

    def pack(state: StructuredState) -> LearnerState:
        flat = jax.tree_util.tree_leaves((state.params, state.opt_state, state.scaler))
        floats = [a.reshape(-1) for a, k in zip(flat, kinds, strict=True) if k == "f"]
        ints = [a.reshape(-1) for a, k in zip(flat, kinds, strict=True) if k == "i"]
        return LearnerState(
            jnp.asarray(state.step, jnp.int32),
            jnp.concatenate(ints) if ints else jnp.zeros((0,), jnp.int32),
            jnp.concatenate(floats) if floats else jnp.zeros((0,), jnp.float32),
        )

    def unpack(packed: LearnerState) -> StructuredState:
        out = []
        offsets = {"f": 0, "i": 0}
        for leaf, kind, size in zip(leaves, kinds, sizes, strict=True):
            source = packed.floats if kind == "f" else packed.ints
            start = offsets[kind]
            out.append(source[start : start + size].reshape(leaf.shape))
            offsets[kind] = start + size
        params, opt_state, scaler = jax.tree_util.tree_unflatten(treedef, out)
        return StructuredState(packed.step, params, opt_state, scaler)

    return pack, unpack


def decide_rows(spec: LearnerSpec, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``decide`` for every row of ``predict_proba`` at once: (scores, decisions) as float64.

    Gives exactly the same numbers as calling ``decide`` row by row.
    """
    p = np.asarray(proba, dtype=np.float64).reshape(-1, spec.n_outputs)
    if spec.head == "binary":
        scores = p[:, 0].copy()
        return scores, (scores >= spec.threshold).astype(np.float64)
    if spec.head == "multiclass":
        idx = np.argmax(p, axis=1)
        return p[np.arange(p.shape[0]), idx], idx.astype(np.float64)
    scores = p[:, 0].copy()
    return scores, scores.copy()


def _make_optimizer(spec: LearnerSpec) -> optax.GradientTransformation:
    if spec.optimizer == "sgd":
        return optax.sgd(spec.learning_rate)
    if spec.optimizer == "adagrad":
        return optax.adagrad(spec.learning_rate)
    return optax.adam(spec.learning_rate)


def _layer_widths(spec: LearnerSpec) -> list[int]:
    hidden = list(spec.hidden) if spec.kind == "mlp" else []
    return [spec.n_features, *hidden, spec.n_outputs]


def _init_params(spec: LearnerSpec) -> Params:
    widths = _layer_widths(spec)
    shapes = list(itertools.pairwise(widths))
    if spec.kind == "mlp":
        # Glorot & Bengio (2010) normal init, std = sqrt(2 / (fan_in + fan_out)). One
        # draw sliced per layer: a single threefry instance compiles much faster than one
        # per layer, and the split points are fixed by the spec.
        key = jax.random.key(spec.seed, impl=_PRNG_IMPL)
        noise = jax.random.normal(key, (sum(i * o for i, o in shapes),), jnp.float32)
    params: Params = {}
    start = 0
    for i, (fan_in, fan_out) in enumerate(shapes):
        if spec.kind == "mlp":
            std = np.float32(np.sqrt(2.0 / (fan_in + fan_out)))
            block = noise[start : start + fan_in * fan_out].reshape(fan_in, fan_out)
            params[f"layer_{i}_w"] = block * std
            start += fan_in * fan_out
        else:
            # Convex models: zero is a fine, seed-free start.
            params[f"layer_{i}_w"] = jnp.zeros((fan_in, fan_out), jnp.float32)
        params[f"layer_{i}_b"] = jnp.zeros((fan_out,), jnp.float32)
    return params


def _forward(spec: LearnerSpec, params: Params, x: jax.Array) -> jax.Array:
    n_layers = len(_layer_widths(spec)) - 1
    h = x
    for i in range(n_layers):
        # Full float32 precision: accelerators would otherwise default to TF32/bf16.
        h = jnp.matmul(h, params[f"layer_{i}_w"], precision="highest") + params[f"layer_{i}_b"]
        if i < n_layers - 1:
            h = jnp.tanh(h)
    return h


def example_losses(spec: LearnerSpec, logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example loss of the spec's head for raw outputs ``logits`` [N, n_outputs] and labels [N]."""
    if spec.head == "binary":
        return optax.sigmoid_binary_cross_entropy(logits[:, 0], y)
    if spec.head == "multiclass":
        return optax.softmax_cross_entropy_with_integer_labels(logits, y.astype(jnp.int32))
    return 0.5 * jnp.square(logits[:, 0] - y)


def _outputs(spec: LearnerSpec, logits: jax.Array) -> jax.Array:
    if spec.head == "binary":
        return jax.nn.sigmoid(logits)
    if spec.head == "multiclass":
        return jax.nn.softmax(logits, axis=-1)
    return logits


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(mask * values) / jnp.maximum(jnp.sum(mask), 1.0)


def _l2_penalty(spec: LearnerSpec, params: Params) -> jax.Array:
    if spec.l2 == 0.0:
        return jnp.zeros((), jnp.float32)
    weights = [v for k, v in sorted(params.items()) if k.endswith("_w")]
    return spec.l2 * 0.5 * sum((jnp.sum(jnp.square(w)) for w in weights), jnp.zeros((), jnp.float32))


def _scaler_update(scaler: ScalerState, x: jax.Array, mask: jax.Array) -> ScalerState:
    # Chan, Golub & LeVeque (1979) pairwise combine of (count, mean, M2): exact for any
    # batch split, and a batch of only padding (n_b = 0) leaves the scaler unchanged.
    n_b = jnp.sum(mask)
    mean_b = jnp.sum(mask[:, None] * x, axis=0) / jnp.maximum(n_b, 1.0)
    m2_b = jnp.sum(mask[:, None] * jnp.square(x - mean_b), axis=0)
    count = scaler.count + n_b
    safe = jnp.maximum(count, 1.0)
    delta = mean_b - scaler.mean
    mean = scaler.mean + delta * (n_b / safe)
    m2 = scaler.m2 + m2_b + jnp.square(delta) * (scaler.count * n_b / safe)
    return ScalerState(count, mean, m2)


def _standardise(scaler: ScalerState, x: jax.Array) -> jax.Array:
    var = scaler.m2 / jnp.maximum(scaler.count, 1.0)
    return (x - scaler.mean) / jnp.sqrt(var + _VAR_EPS)


@functools.cache
def _zeros(n: int) -> np.ndarray:
    # Dummy labels for predict; read-only so the shared cached array cannot be mutated.
    out = np.zeros((n,), np.float32)
    out.flags.writeable = False
    return out


def _pad_rows(spec: LearnerSpec, x: np.ndarray) -> tuple[np.ndarray, int]:
    # Pad N up to a power-of-two bucket so serving compiles O(log N) shapes, not one per N.
    xa = np.asarray(x, dtype=np.float32)
    if xa.ndim != 2 or xa.shape[1] != spec.n_features:
        raise ValueError(f"x must have shape (n, {spec.n_features}), got {xa.shape}")
    n = xa.shape[0]
    bucket = max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    if bucket == n:
        return xa, n
    padded = np.zeros((bucket, spec.n_features), np.float32)
    padded[:n] = xa
    return padded, n
