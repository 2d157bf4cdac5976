"""The smallest change to one row's inputs that would have flipped the decision.

Distances are measured in the model's standardised units (one unit = one standard
deviation of that feature, as the model's scaler saw it), so features on different
scales compare fairly, and every change is reported back in raw feature units.

* Linear kinds: the decision boundary is a hyperplane in z, so the minimal-L2 change is
  the orthogonal projection onto it (binary: ``Δz = (target - logit) · w / ‖w‖²``;
  multi-class: the nearest of the pairwise boundaries ``logit_k = logit_c``), and the
  cheapest single-feature change is along the largest weight.
* An MLP: DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016), i.e. repeated
  projection onto the boundary of the local linearisation, gradients by ``jax.grad``;
  single features by a grid search over ±10 standard deviations refined by bisection.

Every candidate is pushed a margin of 0.01 (in logit units) past the boundary and then
re-scored by the model's own ``predict_proba`` with the same state, so ``flips`` is a
verified fact, not a prediction of the linearisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from domain.spec import LearnerSpec
from projections.attribution import LINEAR_KINDS, linear_weights, standardisation, standardised
from projections.learners import LearnerState, decide, logits_fn, make_learner

MARGIN = 0.01  # how far past the boundary a change goes, in logit units
DEEPFOOL_MAX_ITER = 50
SEARCH_MAX_SD = 10.0
SEARCH_POINTS = 80
SEARCH_MAX_FEATURES = 64
BISECTION_STEPS = 40


@dataclass(frozen=True)
class FeatureChange:
    """One feature's move: raw units and standard deviations (``change_sd``)."""

    feature: str
    value: float
    new_value: float
    change: float
    change_sd: float


@dataclass(frozen=True)
class Flip:
    """A changed row, re-scored with the same state."""

    changes: tuple[FeatureChange, ...]
    distance_sd: float  # L2 norm of the change in standardised units
    new_score: float
    new_decision: float
    flips: bool


@dataclass(frozen=True)
class Counterfactuals:
    """The smallest overall change and the cheapest single-feature change, if any."""

    method: str
    applicable: bool
    note: str
    minimal: Flip | None
    single_feature: Flip | None


def rescore(spec: LearnerSpec, state: LearnerState, x: np.ndarray) -> tuple[float, float]:
    """(score, decision) of one row with ``predict_proba`` and ``decide``, as served."""
    proba = make_learner(spec).predict_proba(state, np.asarray(x, np.float64)[None, :])
    return decide(spec, proba[0])


def find_counterfactuals(spec: LearnerSpec, state: LearnerState, x: np.ndarray, decision: float) -> Counterfactuals:
    """Search for the smallest input changes that flip ``decision``.

    Args:
        spec: the learner specification.
        state: the learner state that served the row.
        x: features as used [n_features].
        decision: the served decision.

    Returns:
        ``Counterfactuals``; ``applicable`` is False for a regression head (no threshold).
    """
    row = np.asarray(x, np.float64)
    if spec.head == "regression":
        return Counterfactuals("none", False, "a regression model has no decision threshold to cross", None, None)
    if spec.kind in LINEAR_KINDS:
        return _linear(spec, state, row, decision)
    return _mlp(spec, state, row, decision)


def _flip(spec: LearnerSpec, state: LearnerState, x: np.ndarray, dz: np.ndarray, decision: float) -> Flip:
    sd = standardisation(spec, state).sd
    dx = dz * sd
    new_x = x + dx
    score, new_decision = rescore(spec, state, new_x)
    changes = tuple(
        FeatureChange(spec.feature_names[j], float(x[j]), float(new_x[j]), float(dx[j]), float(dz[j]))
        for j in np.argsort(-np.abs(dz), kind="stable")
        if dz[j] != 0.0
    )
    return Flip(changes, float(np.linalg.norm(dz)), score, new_decision, new_decision != decision)


def _linear(spec: LearnerSpec, state: LearnerState, x: np.ndarray, decision: float) -> Counterfactuals:
    w, b = linear_weights(spec, state)
    z = standardised(spec, state, x)
    logits = b + z @ w
    # Each candidate boundary: a direction d in z and the logit gap `need` to cross it.
    candidates: list[tuple[np.ndarray, float]] = []
    if spec.head == "binary":
        boundary = math.log(spec.threshold / (1.0 - spec.threshold))
        target = boundary - MARGIN if decision == 1.0 else boundary + MARGIN
        candidates.append((w[:, 0], target - float(logits[0])))
    else:
        c = int(decision)
        for k in range(spec.n_outputs):
            if k != c:
                candidates.append((w[:, k] - w[:, c], float(logits[c] - logits[k]) + MARGIN))
    usable = [(d, need) for d, need in candidates if float(d @ d) > 0.0]
    method = "exact: projection onto the linear decision boundary in standardised units"
    if not usable:
        return Counterfactuals(
            method, True, "every weight is zero at this version: no input change moves it", None, None
        )
    d, need = min(usable, key=lambda c: abs(c[1]) / math.sqrt(float(c[0] @ c[0])))
    minimal = _flip(spec, state, x, need * d / float(d @ d), decision)
    # Cheapest single feature: the largest |d_j| against its boundary's gap.
    best: tuple[float, int, float] | None = None
    for d_k, need_k in usable:
        for j in np.flatnonzero(d_k):
            step = need_k / float(d_k[j])
            if best is None or abs(step) < abs(best[0]):
                best = (step, int(j), need_k)
    single = None
    if best is not None:
        dz = np.zeros_like(z)
        dz[best[1]] = best[0]
        single = _flip(spec, state, x, dz, decision)
    return Counterfactuals(method, True, "", minimal, single)


def _mlp(spec: LearnerSpec, state: LearnerState, x: np.ndarray, decision: float) -> Counterfactuals:
    view = standardisation(spec, state)
    f = logits_fn(spec)
    mean32, sd32 = jnp.asarray(view.mean, jnp.float32), jnp.asarray(view.sd, jnp.float32)

    def logits_of_z(z: jax.Array) -> jax.Array:
        return f(state, mean32 + z * sd32)

    jacobian = jax.jit(jax.jacfwd(logits_of_z))
    z0 = standardised(spec, state, x)
    dz = np.zeros_like(z0)
    minimal = None
    for _ in range(DEEPFOOL_MAX_ITER):
        z = z0 + dz
        logits = np.asarray(logits_of_z(jnp.asarray(z, jnp.float32)), np.float64)
        jac = np.asarray(jacobian(jnp.asarray(z, jnp.float32)), np.float64)
        step = _deepfool_step(spec, logits, jac, decision)
        if step is None:
            break
        dz = dz + step
        candidate = _flip(spec, state, x, dz, decision)
        if candidate.flips:
            minimal = candidate
            break
    method = (
        "DeepFool (Moosavi-Dezfooli et al. 2016): repeated projection onto the linearised boundary; "
        f"single features: grid search over ±{SEARCH_MAX_SD:g} standard deviations, then bisection"
    )
    single = _single_feature_search(spec, state, x, z0, decision, view.sd)
    note = "" if minimal else f"no flip found within {DEEPFOOL_MAX_ITER} DeepFool steps"
    return Counterfactuals(method, True, note, minimal, single)


def _deepfool_step(spec: LearnerSpec, logits: np.ndarray, jac: np.ndarray, decision: float) -> np.ndarray | None:
    # Binary: h = logit - boundary must change sign. Multi-class: the nearest pairwise
    # boundary f_k = logit_k - logit_c = 0 under the local linearisation.
    if spec.head == "binary":
        boundary = math.log(spec.threshold / (1.0 - spec.threshold))
        h = logits[0] - boundary
        grad = jac[0]
        target = -MARGIN if decision == 1.0 else MARGIN
        norm2 = float(grad @ grad)
        return None if norm2 == 0.0 else (target - h) * grad / norm2
    c = int(decision)
    best: tuple[float, np.ndarray] | None = None
    for k in range(spec.n_outputs):
        if k == c:
            continue
        grad = jac[k] - jac[c]
        norm = math.sqrt(float(grad @ grad))
        if norm == 0.0:
            continue
        gap = float(logits[c] - logits[k]) + MARGIN
        if best is None or gap / norm < best[0]:
            best = (gap / norm, gap * grad / norm**2)
    return None if best is None else best[1]


def _single_feature_search(
    spec: LearnerSpec, state: LearnerState, x: np.ndarray, z0: np.ndarray, decision: float, sd: np.ndarray
) -> Flip | None:
    # Each feature alone, both directions, on a geometric grid of offsets (in sd), all
    # scored in one predict_proba call; the smallest flipping offset is then bisected.
    learner = make_learner(spec)
    features = np.arange(spec.n_features)[:SEARCH_MAX_FEATURES]
    offsets = np.geomspace(0.01, SEARCH_MAX_SD, SEARCH_POINTS)
    grid = np.concatenate([offsets, -offsets])
    rows = np.repeat(x[None, :], len(features) * len(grid), axis=0)
    for i, j in enumerate(features):
        rows[i * len(grid) : (i + 1) * len(grid), j] += grid * sd[j]
    proba = learner.predict_proba(state, rows)
    flipped = np.asarray([decide(spec, p)[1] != decision for p in proba]).reshape(len(features), len(grid))
    best: tuple[float, int] | None = None
    for i, j in enumerate(features):
        hits = grid[flipped[i]]
        if hits.size:
            t = float(hits[np.argmin(np.abs(hits))])
            if best is None or abs(t) < abs(best[0]):
                best = (t, int(j))
    if best is None:
        return None
    t, j = best
    lo, hi = 0.0, t  # lo keeps the decision, hi flips it
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        trial = x.copy()
        trial[j] += mid * sd[j]
        if rescore(spec, state, trial)[1] != decision:
            hi = mid
        else:
            lo = mid
    dz = np.zeros_like(z0)
    dz[j] = hi
    return _flip(spec, state, x, dz, decision)
