"""Input checks shared by the aggregates: finite numbers and well-formed vectors."""

from __future__ import annotations

import math
from collections.abc import Sequence

from domain.errors import InvalidArgumentError, NonFiniteValueError


def require_finite(name: str, value: float) -> None:
    """Raise ``NonFiniteValueError`` if ``value`` is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteValueError(f"{name} must be a finite number, got {value}")


def require_features(values: Sequence[float], n_features: int, model_name: str) -> tuple[float, ...]:
    """Check a feature vector's length and finiteness; return it as a tuple of floats.

    Raises:
        InvalidArgumentError: wrong number of features.
        NonFiniteValueError: a NaN or infinite value, naming its index.
    """
    if len(values) != n_features:
        raise InvalidArgumentError(f"model {model_name!r} expects {n_features} features, got {len(values)}")
    out = tuple(map(float, values))
    if not all(map(math.isfinite, out)):  # C-level loop; the slow scan only names the index
        for i, v in enumerate(out):
            if not math.isfinite(v):
                raise NonFiniteValueError(f"feature {i} is {v}; features must be finite numbers")
    return out
