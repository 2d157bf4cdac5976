"""The safety fold: gates on candidate updates, drift detectors, the replay buffer.

Everything here is a deterministic function of the log: the holdout split is a salted
hash of the prediction id, the gate's holdout window is the tail of the holdout ids the
update events recorded, the detectors see the served errors of the recorded examples in
recorded order, and the replay buffer's choice is seeded by the step. The live learner
and ``audit verify`` drive the same ``SafetyContext``, so replay re-derives every
verdict and every detection at the same log position.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from uuid import UUID

import numpy as np
from river.drift import ADWIN, PageHinkley
from scipy import stats

from domain.policy import SafetyPolicy
from domain.spec import LearnerSpec
from projections.learners import Learner, LearnerState

_HASH_SPACE = 2**64


def in_holdout(policy: SafetyPolicy, prediction_id: UUID) -> bool:
    """Whether a labeled prediction belongs to the gate's holdout (never trained on)."""
    if policy.holdout_fraction <= 0.0:
        return False
    digest = hashlib.sha256(policy.holdout_salt.to_bytes(8, "big") + prediction_id.bytes).digest()
    return int.from_bytes(digest[:8], "big") < policy.holdout_fraction * _HASH_SPACE


def served_error(spec: LearnerSpec, score: float, decision: float, label: float) -> float:
    """The error of a served prediction: 0/1 for classification, absolute for regression.

    Bounded 0/1 errors are what ADWIN's guarantees assume; it is the served decision's
    error, a fact of the log, independent of any later state.
    """
    if spec.head == "regression":
        return abs(score - label)
    return 0.0 if decision == label else 1.0


@dataclass(frozen=True)
class Example:
    """A labeled prediction as the safety fold sees it."""

    prediction_id: UUID
    features: tuple[float, ...]
    label: float
    score: float
    decision: float


@dataclass(frozen=True)
class GateVerdict:
    """Whether a candidate may serve, why not, and the figures the decision rested on."""

    accepted: bool
    reason: str
    figures: dict[str, float]


def evaluate_gate(
    spec: LearnerSpec,
    learner: Learner,
    current: LearnerState,
    candidate: LearnerState,
    finite: bool,
    holdout_x: np.ndarray,
    holdout_y: np.ndarray,
    anchor: LearnerState | None = None,
) -> GateVerdict:
    """Judge a candidate state against the current one, by the model's policy.

    Checks, in order: finite parameters, the update-norm bound, the weight bound, the
    declared per-feature envelope (linear kinds), then the holdout loss: accepted only
    when a one-sided paired t-test shows, at ``gate_alpha``, that the candidate's mean
    per-example loss is less than ``gate_tolerance`` above the current version's (and
    above the anchor's, ``gate_anchor_lag`` updates back). With fewer than ``min_holdout`` examples the loss
    test is skipped and the figures say so (``holdout_n``).
    """
    policy = spec.policy
    figures: dict[str, float] = {}
    if policy.holdout_fraction > 0.0:
        figures["holdout_n"] = float(len(holdout_y))
    if not finite:
        return GateVerdict(False, "non-finite parameters after the step", figures)
    if policy.max_update_norm > 0.0 or policy.weight_bound > 0.0:
        cand_params = _flat_params(learner, candidate)
        norm = float(np.linalg.norm(cand_params - _flat_params(learner, current)))
        largest = float(np.max(np.abs(cand_params))) if cand_params.size else 0.0
        figures["update_norm"] = norm
        figures["max_abs_weight"] = largest
        if policy.max_update_norm > 0.0 and norm > policy.max_update_norm:
            return GateVerdict(False, f"update norm {norm:.6g} exceeds the bound {policy.max_update_norm:g}", figures)
        if policy.weight_bound > 0.0 and largest > policy.weight_bound:
            return GateVerdict(False, f"a weight of {largest:.6g} exceeds the bound {policy.weight_bound:g}", figures)
    if policy.feature_bounds:
        # Linear kinds only (the spec refuses an envelope on an MLP): row i of the first
        # layer holds feature i's coefficients, one per output.
        weights = np.asarray(learner.unpack(candidate).params["layer_0_w"])
        for name, low, high in policy.feature_bounds:
            row = weights[spec.feature_names.index(name)]
            if float(row.min()) < low or float(row.max()) > high:
                return GateVerdict(
                    False,
                    f"coefficient of {name!r} leaves the declared envelope [{low:g}, {high:g}]",
                    figures,
                )
    n = len(holdout_y)
    if policy.holdout_fraction > 0.0 and n >= policy.min_holdout:
        # Padded to the window's full size: one compiled shape for every call, instead of
        # a compile per padding bucket while the window fills (~0.8 s each).
        size = max(policy.holdout_size, n)
        padded_x = np.zeros((size, spec.n_features), dtype=np.float64)
        padded_y = np.zeros((size,), dtype=np.float64)
        padded_x[:n], padded_y[:n] = holdout_x, holdout_y
        loss_candidate = learner.losses(candidate, padded_x, padded_y)[:n]
        figures["holdout_loss_candidate"] = float(loss_candidate.mean())
        references = [("current", current)] + ([("anchor", anchor)] if anchor is not None else [])
        for name, reference in references:
            loss_reference = learner.losses(reference, padded_x, padded_y)[:n]
            mean, t_stat, p_value = _paired_test(loss_candidate - loss_reference, policy.gate_tolerance)
            figures.update(
                {
                    f"holdout_loss_{name}": float(loss_reference.mean()),
                    f"t_stat_{name}": t_stat,
                    f"p_value_{name}": p_value,
                }
            )
            if not all(math.isfinite(v) for v in figures.values()):
                return GateVerdict(False, "non-finite holdout loss", figures)
            if p_value >= policy.gate_alpha:
                return GateVerdict(
                    False,
                    f"holdout loss not shown within {policy.gate_tolerance:g} of the {name} version's "
                    f"(mean change {mean:+.6g}; paired non-inferiority t-test "
                    f"p={p_value:.3g} >= {policy.gate_alpha:g})",
                    figures,
                )
    return GateVerdict(True, "", figures)


def _paired_test(diff: np.ndarray, tolerance: float) -> tuple[float, float, float]:
    """Non-inferiority: mean difference, t statistic and the one-sided p-value of
    H0 "the candidate is worse by the tolerance or more" against H1 "mean(diff) < tolerance".

    The burden of proof is on the candidate: a step that helps some examples a lot and
    hurts many a little (a poisoned batch) has a wide spread and does not show it stays
    within the tolerance; an ordinary small step does, easily.
    """
    n = len(diff)
    mean = float(diff.mean())
    sd = float(diff.std(ddof=1))
    if sd > 0.0:
        t_stat = (mean - tolerance) / (sd / math.sqrt(n))
        return mean, float(t_stat), float(stats.t.cdf(t_stat, n - 1))
    # Every example moved by the same amount: the sign decides.
    return mean, 0.0, 0.0 if mean < tolerance else 1.0


def _flat_params(learner: Learner, state: LearnerState) -> np.ndarray:
    params = learner.unpack(state).params
    return np.concatenate([np.asarray(params[k], dtype=np.float64).ravel() for k in sorted(params)])


@dataclass(frozen=True)
class Detection:
    """A detector fired at this example."""

    detector: str
    at_prediction: UUID
    figures: dict[str, float]


class FeatureShift:
    """Mean shift of the logged features: a reference window, then sliding windows.

    The first ``window`` examples are the reference; afterwards every full window of
    new examples is compared feature by feature, and a mean that moved more than
    ``threshold`` reference standard deviations is a detection.
    """

    def __init__(self, window: int, threshold: float):
        self.window = window
        self.threshold = threshold
        self.reference: tuple[np.ndarray, np.ndarray] | None = None
        self.current: list[tuple[float, ...]] = []

    def update(self, features: tuple[float, ...]) -> dict[str, float] | None:
        """Add one example; the figures of a detection, or None."""
        self.current.append(features)
        if len(self.current) < self.window:
            return None
        block = np.asarray(self.current, dtype=np.float64)
        self.current = []
        if self.reference is None:
            self.reference = (block.mean(axis=0), block.std(axis=0) + 1e-12)
            return None
        mean, sd = self.reference
        shift = np.abs(block.mean(axis=0) - mean) / sd
        worst = int(np.argmax(shift))
        if float(shift[worst]) > self.threshold:
            return {"feature_index": float(worst), "shift_sd": float(shift[worst])}
        return None


class DriftMonitor:
    """The policy's detectors, fed served errors and features in log order."""

    def __init__(self, spec: LearnerSpec):
        self.spec = spec
        self.reset()

    def reset(self) -> None:
        """Fresh detectors (after a drift is acted upon, or a new baseline)."""
        policy = self.spec.policy
        self.adwin = ADWIN(delta=policy.adwin_delta) if "adwin" in policy.drift_detectors else None
        self.page_hinkley = (
            PageHinkley(
                min_instances=policy.ph_min_instances, delta=policy.ph_delta, threshold=policy.ph_threshold, mode="up"
            )
            if "page_hinkley" in policy.drift_detectors
            else None
        )
        self.features = (
            FeatureShift(policy.feature_window, policy.feature_shift) if "features" in policy.drift_detectors else None
        )
        self.seen = 0

    @property
    def active(self) -> bool:
        """Whether any detector is configured."""
        return bool(self.spec.policy.drift_detectors)

    def observe(self, examples: Iterable[Example]) -> Detection | None:
        """Feed examples in order; stop at (and return) the first detection."""
        if not self.active:
            return None
        for ex in examples:
            self.seen += 1
            error = served_error(self.spec, ex.score, ex.decision, ex.label)
            if self.adwin is not None:
                earlier = self.adwin.estimation
                self.adwin.update(error)
                # ADWIN cuts its window on a change either way; only a rise in the error
                # rate is drift to act on (the error falling as the model learns is not).
                if self.adwin.drift_detected and self.adwin.estimation > earlier:
                    figures = {"error_estimate": float(self.adwin.estimation), "window": float(self.adwin.width)}
                    return self._detected("adwin", ex, figures)
            if self.page_hinkley is not None:
                self.page_hinkley.update(error)
                if self.page_hinkley.drift_detected:
                    return self._detected("page_hinkley", ex, {"error": error})
            if self.features is not None:
                found = self.features.update(ex.features)
                if found is not None:
                    return self._detected("features", ex, found)
        return None

    def _detected(self, name: str, ex: Example, figures: dict[str, float]) -> Detection:
        figures = {**figures, "examples_seen": float(self.seen)}
        self.reset()  # a detection is acted upon once; watching starts afresh after it
        return Detection(name, ex.prediction_id, figures)


class ReplayPool:
    """The most recently trained examples, from which each update mixes some back in."""

    def __init__(self, policy: SafetyPolicy):
        self.policy = policy
        self.pool: deque[Example] = deque(maxlen=policy.replay_pool)

    def choose(self, step: int, batch_size: int) -> list[Example]:
        """The examples to mix into the update at ``step`` (seeded by policy seed and step)."""
        # At least one new example per update: a batch of replays alone would learn nothing new.
        k = min(len(self.pool), round(self.policy.replay_fraction * batch_size), batch_size - 1)
        if k <= 0:
            return []
        rng = np.random.default_rng([self.policy.replay_seed, step])
        picks = rng.choice(len(self.pool), size=k, replace=False)
        return [self.pool[int(i)] for i in sorted(picks)]

    def extend(self, trained: Iterable[Example]) -> None:
        """Remember examples just trained on (replayed ones are not added twice)."""
        if self.policy.replay_fraction > 0.0:
            self.pool.extend(trained)


class SafetyContext:
    """What the gate, the detectors and the replay buffer remember between updates."""

    def __init__(self, spec: LearnerSpec):
        self.spec = spec
        self.holdout: deque[Example] = deque(maxlen=spec.policy.holdout_size)
        self._empty = (np.zeros((0, spec.n_features)), np.zeros((0,)))
        self.drift = DriftMonitor(spec)
        self.replay = ReplayPool(spec.policy)
        # The head state after each of the last updates (accepted or not), newest last:
        # the gate's anchor is the oldest. Rejections move it too, so a model cannot be
        # stuck forever behind an anchor it can no longer match.
        self.heads: deque[LearnerState] = deque(maxlen=max(1, spec.policy.gate_anchor_lag))
        # The recent trained examples a drift-triggered rebaseline re-fits on.
        self.recent: deque[Example] = deque(maxlen=max(spec.policy.replay_pool, spec.policy.feature_window))

    def holdout_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The gate's holdout window as (features, labels)."""
        if not self.holdout:  # the default policy, every step: no arrays to build
            return self._empty
        x = np.asarray([e.features for e in self.holdout], dtype=np.float64).reshape(-1, self.spec.n_features)
        y = np.asarray([e.label for e in self.holdout], dtype=np.float64)
        return x, y

    def anchor(self) -> LearnerState | None:
        """The head state ``gate_anchor_lag`` updates back (None until there are that many)."""
        lag = self.spec.policy.gate_anchor_lag
        return self.heads[0] if lag > 0 and len(self.heads) == lag else None

    def after_update(
        self,
        trained: Sequence[Example],
        holdout: Sequence[Example],
        accepted: bool,
        head: LearnerState | None = None,
    ) -> Detection | None:
        """After an update's verdict: remember what it trained on, feed the detectors.

        The detectors see the batch, then its holdout examples: the order the event
        records, so ``audit verify`` feeds them identically. Replayed examples are not
        fed again (they were fed when first consumed).
        """
        self.recent.extend(trained)
        if accepted:
            self.replay.extend(trained)
        if head is not None and self.spec.policy.holdout_fraction > 0.0:
            self.heads.append(head)
        found = self.drift.observe([*trained, *holdout])
        if found is not None:
            # A new regime: the old holdout and anchors judge candidates by the concept
            # that just ended and would block every step towards the new one. The gate
            # checks parameters only until ``min_holdout`` new holdout examples arrive.
            self.holdout.clear()
            self.heads.clear()
        return found
