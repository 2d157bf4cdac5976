"""Canary rollout: which predictions a candidate serves, and when it may advance.

Traffic is split by prediction id (a hash, so a retried request lands on the same arm)
and the verdict compares served errors of labeled predictions: the candidate's canary
traffic against the champion's control traffic of the same stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from uuid import UUID

from domain.model import Model

_HASH_SPACE = 2**64
ROLLOUT_SALT = b"learnledger:rollout"


def routes_to_candidate(prediction_id: UUID, fraction: float) -> bool:
    """Whether this prediction is served by the rollout's candidate."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(ROLLOUT_SALT + prediction_id.bytes).digest()
    return int.from_bytes(digest[:8], "big") < fraction * _HASH_SPACE


@dataclass
class StageTally:
    """Served errors of labeled canary and control predictions in the current stage."""

    candidate_n: int = 0
    candidate_error: float = 0.0
    control_n: int = 0
    control_error: float = 0.0

    def add(self, routing: str, error: float) -> None:
        """Count one labeled prediction's served error on its arm."""
        if routing == "candidate":
            self.candidate_n += 1
            self.candidate_error += error
        elif routing == "control":
            self.control_n += 1
            self.control_error += error

    def figures(self) -> dict[str, float]:
        """Means and counts, as the rollout events record them."""
        return {
            "candidate_n": float(self.candidate_n),
            "candidate_loss": self.candidate_error / self.candidate_n if self.candidate_n else 0.0,
            "control_n": float(self.control_n),
            "control_loss": self.control_error / self.control_n if self.control_n else 0.0,
        }


def judge(model: Model, tally: StageTally) -> str | None:
    """``advance``, ``abort`` or None (not enough labels yet) for the current stage."""
    policy = model.spec.policy
    needed = policy.rollout_min_labels
    if tally.candidate_n < needed or tally.control_n < needed:
        return None
    f = tally.figures()
    return "advance" if f["candidate_loss"] <= f["control_loss"] + policy.rollout_tolerance else "abort"
