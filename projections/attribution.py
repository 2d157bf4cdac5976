"""Why a model scored one row as it did: per-feature contributions, exact or integrated.

Every method here explains the model's *raw output* for the decided outcome (binary:
the log-odds of class 1; multi-class: the decided class's logit; regression: the
prediction), relative to the feature averages the model's own scaler holds (z = 0):

* linear kinds (``logistic``, ``softmax``, ``linear``) are additive in the standardised
  features, so ``output = intercept + Σ_j w_j · z_j`` exactly and each ``w_j · z_j`` is
  that feature's contribution;
* an ``mlp`` is not, so it gets integrated gradients (Sundararajan, Taly & Yan, "Axiomatic
  Attribution for Deep Networks", ICML 2017) from the same baseline, whose completeness
  axiom says the attributions sum to ``output(x) - output(baseline)``; the residual of
  the numerical integral is reported as the completeness gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from domain.spec import LearnerSpec
from projections.learners import LearnerState, logits_fn, make_learner

IG_STEPS = 256  # trapezoid rule on 257 points; Sundararajan et al. suggest 20-300 steps
LINEAR_KINDS = ("logistic", "softmax", "linear")


@dataclass(frozen=True)
class Standardisation:
    """The model's view of the features at one version: z = (x - mean) / sd."""

    mean: np.ndarray  # float64 [n_features]; the baseline ("average") of every method here
    sd: np.ndarray  # float64 [n_features]; 1 when the spec does not standardise


@dataclass(frozen=True)
class Attribution:
    """Contributions to the raw output ``output = baseline_output + Σ contributions``.

    ``completeness_gap`` is ``|baseline_output + Σ contributions - output|``: rounding
    only (≈1e-7) for the exact linear decomposition, the integral's error for IG.
    """

    method: str
    output_name: str
    output_index: int
    output: float
    baseline_output: float
    contributions: np.ndarray  # float64 [n_features], in feature order
    completeness_gap: float
    steps: int | None


def standardisation(spec: LearnerSpec, state: LearnerState) -> Standardisation:
    """The scaler's mean and standard deviation at this state, as the model applies them."""
    if not spec.standardize:
        return Standardisation(np.zeros(spec.n_features), np.ones(spec.n_features))
    scaler = make_learner(spec).unpack(state).scaler
    count = np.float32(max(float(np.asarray(scaler.count)), 1.0))
    var = np.asarray(scaler.m2, np.float32) / count
    # Same float32 operations as learners._standardise, so z matches the model's own z.
    sd = np.sqrt(var + np.float32(1e-8))
    return Standardisation(np.asarray(scaler.mean, np.float64), sd.astype(np.float64))


def output_index(spec: LearnerSpec, decision: float) -> int:
    """Which output the explanation is about: the decided class for multi-class, else 0."""
    return int(decision) if spec.head == "multiclass" else 0


def output_name(spec: LearnerSpec, decision: float) -> str:
    """Plain words for the explained output."""
    if spec.head == "binary":
        return "log-odds of a positive (1) decision"
    if spec.head == "multiclass":
        return f"logit of the decided class {int(decision)}"
    return "the predicted value"


def attribute(spec: LearnerSpec, state: LearnerState, x: np.ndarray, decision: float) -> Attribution:
    """Per-feature contributions to the explained output for one row of features.

    Args:
        spec: the learner specification.
        state: the learner state that served the row.
        x: features as used [n_features].
        decision: the decision that was served (selects the class for multi-class).

    Returns:
        An exact decomposition for linear kinds, integrated gradients for an MLP.
    """
    row = np.asarray(x, np.float64)
    index = output_index(spec, decision)
    output = float(np.asarray(logits_fn(spec)(state, jnp.asarray(row, jnp.float32)))[index])
    if spec.kind in LINEAR_KINDS:
        return _linear_attribution(spec, state, row, decision, index, output)
    return _integrated_gradients(spec, state, row, decision, index, output)


def linear_weights(spec: LearnerSpec, state: LearnerState) -> tuple[np.ndarray, np.ndarray]:
    """A linear kind's weights [n_features, n_outputs] and biases [n_outputs], as float64."""
    params = make_learner(spec).unpack(state).params
    return np.asarray(params["layer_0_w"], np.float64), np.asarray(params["layer_0_b"], np.float64)


def standardised(spec: LearnerSpec, state: LearnerState, x: np.ndarray) -> np.ndarray:
    """z for one row, computed with the model's float32 operations, returned as float64."""
    if not spec.standardize:
        return np.asarray(x, np.float64)
    view = standardisation(spec, state)
    # mean and sd came from float32 values, so these casts are exact.
    z = (np.asarray(x, np.float32) - view.mean.astype(np.float32)) / view.sd.astype(np.float32)
    return z.astype(np.float64)


def _linear_attribution(
    spec: LearnerSpec, state: LearnerState, x: np.ndarray, decision: float, index: int, output: float
) -> Attribution:
    w, b = linear_weights(spec, state)
    z = standardised(spec, state, x)
    contributions = w[:, index] * z
    intercept = float(b[index])
    gap = abs(intercept + float(np.sum(contributions)) - output)
    return Attribution(
        method="exact linear decomposition: output = intercept + Σ w_j·z_j, z = standardised feature",
        output_name=output_name(spec, decision),
        output_index=index,
        output=output,
        baseline_output=intercept,
        contributions=contributions,
        completeness_gap=gap,
        steps=None,
    )


def _integrated_gradients(
    spec: LearnerSpec, state: LearnerState, x: np.ndarray, decision: float, index: int, output: float
) -> Attribution:
    # IG_j = (x_j - x'_j) ∫_0^1 ∂F/∂x_j (x' + α(x - x')) dα, x' = the scaler's mean (z = 0).
    # Standardisation is a per-feature affine map, so IG in raw or standardised units
    # gives the same attributions; the trapezoid rule is exact at both ends of the path.
    baseline = standardisation(spec, state).mean
    f = logits_fn(spec)

    def target(row: jax.Array) -> jax.Array:
        return f(state, row)[index]

    alphas = np.linspace(0.0, 1.0, IG_STEPS + 1)
    path = (baseline[None, :] + alphas[:, None] * (x - baseline)[None, :]).astype(np.float32)
    grads = np.asarray(jax.vmap(jax.grad(target))(jnp.asarray(path)), np.float64)
    weights = np.full(IG_STEPS + 1, 1.0 / IG_STEPS)
    weights[[0, -1]] *= 0.5
    contributions = (x - baseline) * (weights @ grads)
    baseline_output = float(np.asarray(target(jnp.asarray(baseline, jnp.float32))))
    gap = abs(baseline_output + float(np.sum(contributions)) - output)
    return Attribution(
        method=(
            f"integrated gradients (Sundararajan et al. 2017), baseline = feature averages (z = 0), "
            f"trapezoid rule with {IG_STEPS} steps, gradients by jax.grad"
        ),
        output_name=output_name(spec, decision),
        output_index=index,
        output=output,
        baseline_output=baseline_output,
        contributions=contributions,
        completeness_gap=gap,
        steps=IG_STEPS,
    )
