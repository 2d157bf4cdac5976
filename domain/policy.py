"""Safety policy: how a model's candidate updates are gated, drift is watched, and new
versions are rolled out. Part of the spec, so it is recorded at registration and replay
applies exactly the rules that were in force."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from domain.errors import InvalidSpecError

DRIFT_DETECTORS = ("adwin", "page_hinkley", "features")
DRIFT_ACTIONS = ("alert", "pause", "rebaseline")


@dataclass(frozen=True)
class SafetyPolicy:
    """Gates, drift detection, replay buffer and rollout rules of one model.

    Everything here changes which updates serve, so it lives in the log with the spec.
    A default policy gates only on finite parameters; turn the rest on per model.

    Attributes:
        holdout_fraction: share of labeled predictions, chosen by a salted hash of the
            prediction id, that are never trained on and form the gate's holdout (0: no
            holdout, the gate then checks parameters only).
        holdout_salt: salt of that hash (recorded, so the split is reproducible).
        holdout_size: the gate evaluates on the most recent this-many holdout examples.
        min_holdout: below this many holdout examples the loss test is skipped (recorded).
        gate_tolerance: how much worse (mean per-example loss) a candidate may be.
        gate_alpha: significance level of the one-sided paired (non-inferiority) t-test:
            a candidate serves only when the test shows, at this level, that its holdout
            loss is less than the tolerance above the reference's.
        gate_anchor_lag: the candidate is also tested against the head state this many
            updates back, so that a poison that moves the model a little per step cannot
            creep through one tolerated step at a time (0: off).
        max_update_norm: largest allowed L2 norm of the parameter change (0: no bound).
        weight_bound: every parameter must satisfy ``|w| <= weight_bound`` (0: no bound).
        feature_bounds: the declared change envelope for linear kinds: per named
            feature, the allowed ``[low, high]`` of its (standardised) coefficients.
        drift_detectors: any of ``adwin``, ``page_hinkley`` (River's detectors on the
            served error stream) and ``features`` (mean shift of the logged features).
        drift_action: on drift: ``alert`` (record only), ``pause`` learning, or
            ``rebaseline`` (re-fit on recent data and roll the result out).
        adwin_delta: ADWIN's confidence parameter.
        ph_threshold: Page-Hinkley's alarm threshold.
        ph_delta: Page-Hinkley's tolerated change magnitude.
        ph_min_instances: Page-Hinkley's warm-up.
        feature_window: examples per window of the feature-distribution check.
        feature_shift: alarm when a feature's window mean moves more than this many
            reference standard deviations from the reference window's mean.
        replay_fraction: each update mixes in this fraction (of the batch size) of
            earlier trained examples, chosen by a seeded rule and recorded in the event.
        replay_pool: how many of the most recently trained examples the mix draws from.
        replay_seed: seed of the replay choice.
        rollout_stages: traffic fractions a candidate passes through; the last is 1.0.
        rollout_min_labels: labeled canary predictions needed to judge a stage.
        rollout_tolerance: how much worse (mean served loss) the canary may be.
        rebaseline_epochs: passes over the window's examples in a rebaseline.
    """

    holdout_fraction: float = 0.0
    holdout_salt: int = 0
    holdout_size: int = 1000
    min_holdout: int = 50
    gate_tolerance: float = 0.0
    gate_alpha: float = 0.05
    gate_anchor_lag: int = 20
    max_update_norm: float = 0.0
    weight_bound: float = 0.0
    feature_bounds: tuple[tuple[str, float, float], ...] = ()
    drift_detectors: tuple[str, ...] = ()
    drift_action: str = "pause"
    adwin_delta: float = 0.002
    ph_threshold: float = 50.0
    ph_delta: float = 0.005
    ph_min_instances: int = 30
    feature_window: int = 500
    feature_shift: float = 1.0
    replay_fraction: float = 0.0
    replay_pool: int = 10_000
    replay_seed: int = 0
    rollout_stages: tuple[float, ...] = (0.01, 0.05, 0.25, 1.0)
    rollout_min_labels: int = 50
    rollout_tolerance: float = 0.0
    rebaseline_epochs: int = 3

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``InvalidSpecError`` naming the first field that is out of range."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidSpecError(f"policy.{f.name} must be a finite number, got {value}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise InvalidSpecError(f"policy.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if not 1 <= self.holdout_size <= 1_000_000 or not 2 <= self.min_holdout <= self.holdout_size:
            raise InvalidSpecError("policy needs 2 <= min_holdout <= holdout_size <= 1000000")
        if self.gate_tolerance < 0.0 or not 0.0 < self.gate_alpha < 1.0:
            raise InvalidSpecError("policy.gate_tolerance must be >= 0 and gate_alpha in (0, 1)")
        if not 0 <= self.gate_anchor_lag <= 10_000:
            raise InvalidSpecError(f"policy.gate_anchor_lag must be between 0 and 10000, got {self.gate_anchor_lag}")
        if self.max_update_norm < 0.0 or self.weight_bound < 0.0:
            raise InvalidSpecError("policy.max_update_norm and weight_bound must be >= 0 (0: no bound)")
        for bound in self.feature_bounds:
            if (
                len(bound) != 3
                or not isinstance(bound[0], str)
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bound[1:])
                or not bound[1] <= bound[2]
            ):
                raise InvalidSpecError(f"policy.feature_bounds entries are [feature, low, high], got {list(bound)}")
        unknown = [d for d in self.drift_detectors if d not in DRIFT_DETECTORS]
        if unknown or len(set(self.drift_detectors)) != len(self.drift_detectors):
            raise InvalidSpecError(f"policy.drift_detectors must be distinct names from {', '.join(DRIFT_DETECTORS)}")
        if self.drift_action not in DRIFT_ACTIONS:
            raise InvalidSpecError(f"policy.drift_action must be one of {', '.join(DRIFT_ACTIONS)}")
        if not 0.0 < self.adwin_delta < 1.0 or self.ph_threshold <= 0.0 or self.ph_delta < 0.0:
            raise InvalidSpecError("policy needs adwin_delta in (0, 1), ph_threshold > 0, ph_delta >= 0")
        if self.ph_min_instances < 1 or self.feature_window < 10 or self.feature_shift <= 0.0:
            raise InvalidSpecError("policy needs ph_min_instances >= 1, feature_window >= 10, feature_shift > 0")
        if not 0.0 <= self.replay_fraction <= 1.0 or self.replay_pool < 1 or self.replay_seed < 0:
            raise InvalidSpecError("policy needs replay_fraction in [0, 1], replay_pool >= 1, replay_seed >= 0")
        stages = self.rollout_stages
        if not stages or stages[-1] != 1.0 or any(not 0.0 < s <= 1.0 for s in stages) or list(stages) != sorted(stages):
            raise InvalidSpecError("policy.rollout_stages must rise within (0, 1] and end at 1.0")
        if self.rollout_min_labels < 1 or self.rollout_tolerance < 0.0 or not 1 <= self.rebaseline_epochs <= 100:
            raise InvalidSpecError("policy needs rollout_min_labels >= 1, rollout_tolerance >= 0, 1-100 epochs")

    @property
    def stateful(self) -> bool:
        """Whether verdicts depend on more than the candidate itself (holdout, bounds,
        detectors or a replay buffer): then ``audit verify`` re-derives them."""
        return bool(
            self.holdout_fraction > 0.0
            or self.max_update_norm > 0.0
            or self.weight_bound > 0.0
            or self.feature_bounds
            or self.drift_detectors
            or self.replay_fraction > 0.0
        )

    def check_features(self, feature_names: tuple[str, ...]) -> None:
        """Raise ``InvalidSpecError`` if the envelope names a feature the model lacks."""
        missing = [b[0] for b in self.feature_bounds if b[0] not in feature_names]
        if missing:
            raise InvalidSpecError(f"policy.feature_bounds names unknown feature(s): {', '.join(missing)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping of every field."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SafetyPolicy:
        """Build a policy from a mapping; unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSpecError(f"unknown policy field(s): {', '.join(unknown)}")
        values = dict(data)
        if "feature_bounds" in values:
            values["feature_bounds"] = tuple(tuple(b) for b in values["feature_bounds"])
        for key in ("drift_detectors", "rollout_stages"):
            if key in values:
                values[key] = tuple(values[key])
        try:
            return cls(**values)
        except TypeError as exc:
            raise InvalidSpecError(str(exc)) from None
