"""Learner specification: everything replay needs to rebuild a model's initial state."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from domain.errors import InvalidSpecError
from domain.policy import SafetyPolicy

LEARNER_KINDS = ("logistic", "softmax", "linear", "mlp")
OPTIMIZERS = ("sgd", "adam", "adagrad")
HEADS = ("binary", "multiclass", "regression")


@dataclass(frozen=True)
class LearnerSpec:
    """What the learner computes: kind, shape, optimizer and hyperparameters.

    A frozen value object recorded in ``Model.Registered``. Everything that changes the
    learned parameters lives here (and therefore in the log); nothing that only changes
    how the service runs does.

    Attributes:
        kind: ``logistic`` (binary), ``softmax`` (multi-class), ``linear`` (regression)
            or ``mlp`` (any head).
        n_features: number of input features.
        feature_names: one name per feature (``x0``… when not given).
        head: ``binary``, ``multiclass`` or ``regression``; implied by every kind but
            ``mlp``.
        n_classes: number of classes for a multi-class head (2 otherwise).
        hidden: hidden layer widths of the MLP (ignored by linear kinds).
        optimizer: ``sgd``, ``adam`` or ``adagrad``.
        learning_rate: optimizer step size.
        l2: L2 penalty on the weights (not the biases).
        batch_size: labeled examples per update step.
        seed: PRNG seed for parameter initialisation.
        standardize: whether a running standardisation of the features is part of the
            folded state.
        threshold: decision threshold on the binary score.
        feedback_window_s: a label whose event time is more than this many seconds after
            the prediction is stored but marked late and never learned from.
        default_label: for tasks where silence means an outcome (no click = 0): a
            prediction still unlabeled when its window closes gets this label, recorded
            as ``Prediction.DefaultLabeled`` so it is never mistaken for a real one.
        max_batch_wait_s: learn from a partial batch once its oldest label has waited
            this long (0: only full batches). The batch taken is recorded either way.
        policy: gates, drift detection, replay buffer and rollout (``SafetyPolicy``).
    """

    kind: str
    n_features: int
    feature_names: tuple[str, ...] = ()
    head: str = ""
    n_classes: int = 2
    hidden: tuple[int, ...] = (32,)
    optimizer: str = "adam"
    learning_rate: float = 0.01
    l2: float = 0.0
    batch_size: int = 16
    seed: int = 0
    standardize: bool = True
    threshold: float = 0.5
    feedback_window_s: float = 30 * 86_400.0
    default_label: float | None = None
    max_batch_wait_s: float = 0.0
    policy: SafetyPolicy = field(default_factory=SafetyPolicy)

    def __post_init__(self) -> None:
        # Fill derived defaults so that the recorded spec is explicit and complete.
        if not self.feature_names and self.n_features > 0:
            object.__setattr__(self, "feature_names", tuple(f"x{i}" for i in range(self.n_features)))
        if not self.head:
            implied = {"logistic": "binary", "softmax": "multiclass", "linear": "regression"}
            object.__setattr__(self, "head", implied.get(self.kind, "binary"))
        self.validate()

    def validate(self) -> None:
        """Raise ``InvalidSpecError`` naming the first field that is out of range."""
        if self.kind not in LEARNER_KINDS:
            raise InvalidSpecError(f"learner kind must be one of {', '.join(LEARNER_KINDS)}, got {self.kind!r}")
        if self.head not in HEADS:
            raise InvalidSpecError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        implied = {"logistic": "binary", "softmax": "multiclass", "linear": "regression"}
        if self.kind in implied and self.head != implied[self.kind]:
            raise InvalidSpecError(f"a {self.kind} learner has a {implied[self.kind]} head, got {self.head!r}")
        if not 1 <= self.n_features <= 100_000:
            raise InvalidSpecError(f"n_features must be between 1 and 100000, got {self.n_features}")
        if len(self.feature_names) != self.n_features:
            raise InvalidSpecError(f"feature_names has {len(self.feature_names)} names for {self.n_features} features")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise InvalidSpecError("feature_names must be unique")
        if self.head == "multiclass" and not 2 <= self.n_classes <= 1000:
            raise InvalidSpecError(f"n_classes must be between 2 and 1000, got {self.n_classes}")
        if any(h < 1 or h > 4096 for h in self.hidden) or len(self.hidden) > 8:
            raise InvalidSpecError("hidden must be at most 8 layers of 1 to 4096 units")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidSpecError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("learning_rate", "l2", "threshold", "feedback_window_s"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidSpecError(f"{name} must be a finite number, got {value}")
        if not 0.0 < self.learning_rate <= 10.0:
            raise InvalidSpecError(f"learning_rate must be in (0, 10], got {self.learning_rate}")
        if self.l2 < 0.0:
            raise InvalidSpecError(f"l2 must be >= 0, got {self.l2}")
        if not 1 <= self.batch_size <= 65_536:
            raise InvalidSpecError(f"batch_size must be between 1 and 65536, got {self.batch_size}")
        if not 0 <= self.seed < 2**31:
            raise InvalidSpecError(f"seed must be between 0 and 2**31-1, got {self.seed}")
        if self.max_batch_wait_s < 0.0 or not math.isfinite(self.max_batch_wait_s):
            raise InvalidSpecError(f"max_batch_wait_s must be a finite number >= 0, got {self.max_batch_wait_s}")
        if self.default_label is not None:
            ok = math.isfinite(self.default_label) and (
                self.head == "regression"
                or (self.head == "binary" and self.default_label in (0.0, 1.0))
                or (
                    self.head == "multiclass"
                    and float(self.default_label).is_integer()
                    and 0 <= self.default_label < self.n_classes
                )
            )
            if not ok:
                raise InvalidSpecError(f"default_label {self.default_label} is not a label a {self.head} model takes")
        if self.feedback_window_s <= 0.0:
            raise InvalidSpecError(f"feedback_window_s must be > 0, got {self.feedback_window_s}")
        if not 0.0 < self.threshold < 1.0:
            raise InvalidSpecError(f"threshold must be in (0, 1), got {self.threshold}")
        self.policy.check_features(self.feature_names)
        if self.policy.feature_bounds and self.kind == "mlp":
            raise InvalidSpecError("policy.feature_bounds (a per-coefficient envelope) needs a linear learner kind")

    @property
    def n_outputs(self) -> int:
        """Width of the model's output layer."""
        return self.n_classes if self.head == "multiclass" else 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping of every field (tuples become lists)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        out["policy"] = self.policy.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnerSpec:
        """Build a spec from a mapping such as a ``--spec FILE.json``; unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSpecError(f"unknown spec field(s): {', '.join(unknown)}")
        if "kind" not in data or "n_features" not in data:
            raise InvalidSpecError("a spec needs at least 'kind' and 'n_features'")
        values = dict(data)
        for key in ("feature_names", "hidden"):
            if key in values:
                values[key] = tuple(values[key])
        if isinstance(values.get("policy"), dict):
            values["policy"] = SafetyPolicy.from_dict(values["policy"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise InvalidSpecError(str(exc)) from None

    def with_changes(self, **changes: Any) -> LearnerSpec:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
