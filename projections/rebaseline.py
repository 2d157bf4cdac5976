"""Rebaseline: a full re-fit from the initial state on a recorded list of examples."""

from __future__ import annotations

import numpy as np

from domain.spec import LearnerSpec
from projections.learners import Learner, LearnerState, make_batch


def refit(spec: LearnerSpec, learner: Learner, x: np.ndarray, y: np.ndarray, epochs: int) -> LearnerState:
    """Fold ``epochs`` passes over the examples, in order, in batches of the spec's size.

    Starts from the spec's initial state (not the drifted one), so the result depends on
    the recorded examples and epochs only, and replay reproduces it exactly. The last
    batch of a pass may be partial; padding rows have no effect.
    """
    state = learner.init()
    size = spec.batch_size
    for _ in range(epochs):
        for start in range(0, len(y), size):
            state, _ = learner.update_step(state, make_batch(spec, x[start : start + size], y[start : start + size]))
    return state
