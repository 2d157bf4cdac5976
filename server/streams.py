"""Synthetic streams for the demo, tests and benchmarks (deterministic from a seed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stream:
    """Examples in arrival order: features ``x`` [N, F] and labels ``y`` [N]."""

    x: np.ndarray
    y: np.ndarray
    drift_at: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.x.shape[0])


def drifting_binary_stream(n: int, *, n_features: int = 6, seed: int = 0, drifts: int = 1) -> Stream:
    """A binary classification stream whose concept changes abruptly ``drifts`` times.

    Features have very different scales and offsets (so standardisation matters); the
    label is a noisy linear concept whose weights are redrawn at each drift point, and
    the concept also rotates slowly between drifts (gradual drift).
    """
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.1, 50.0, n_features)
    offsets = rng.normal(0.0, 3.0, n_features) * scales
    x = rng.normal(0.0, 1.0, (n, n_features)) * scales + offsets
    z = (x - offsets) / scales
    cut_points = [int(n * (k + 1) / (drifts + 1)) for k in range(drifts)]
    y = np.empty(n, dtype=np.float64)
    start = 0
    for segment_end in [*cut_points, n]:
        w = rng.normal(0.0, 1.0, n_features)
        w_end = w + rng.normal(0.0, 0.3, n_features)
        length = segment_end - start
        frac = np.linspace(0.0, 1.0, max(length, 1))[:, None]
        weights = (1 - frac) * w + frac * w_end
        margin = np.einsum("ij,ij->i", z[start:segment_end], weights[:length])
        noise = rng.normal(0.0, 0.3, length)
        y[start:segment_end] = (margin + noise > 0).astype(np.float64)
        start = segment_end
    return Stream(x=x, y=y, drift_at=tuple(cut_points))


def label_arrivals(delays: np.ndarray) -> list[list[int]]:
    """For each step ``t``, the examples whose labels arrive right after prediction ``t``.

    Example ``i``'s label arrives ``delays[i]`` predictions later (the last ones at the
    end of the stream); labels due at the same step arrive newest first, so feedback is
    routinely out of order.
    """
    n = len(delays)
    due = np.minimum(np.arange(n) + np.maximum(np.asarray(delays, dtype=np.int64), 0), n - 1)
    arrivals: list[list[int]] = [[] for _ in range(n)]
    for i in range(n - 1, -1, -1):
        arrivals[int(due[i])].append(i)
    return arrivals


def random_label_delays(n: int, *, mean_delay: float = 20.0, seed: int = 1) -> np.ndarray:
    """How many predictions later each label arrives: geometric, so labels overtake each other."""
    rng = np.random.default_rng(seed)
    if mean_delay <= 0:
        return np.zeros(n, dtype=np.int64)
    return rng.geometric(1.0 / (1.0 + mean_delay), n).astype(np.int64) - 1
