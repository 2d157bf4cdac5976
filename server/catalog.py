"""The served heads: one immutable snapshot per model, swapped atomically after commits."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import numpy as np

from domain.model import Model
from domain.spec import LearnerSpec
from projections.learners import Learner, LearnerState, make_learner
from projections.learning import ModelLearner
from server.services import LedgerService

# Unary predictions committed together are scored together, in blocks of exactly this
# many rows (zero-padded): one compiled shape, whatever the size of the transaction.
SCORE_BLOCK = 64


@dataclass(frozen=True)
class ServedModel:
    """What a prediction is scored with: a committed version's state and digest.

    Frozen and replaced as a whole, so a Predict never sees a half-updated head and the
    version it records is exactly the state it used.
    """

    model_id: UUID
    name: str
    spec: LearnerSpec
    version: int
    digest: str
    state: LearnerState
    paused: bool
    # During a rollout: the candidate version's state serves ``fraction`` of traffic,
    # chosen by prediction id (``projections.rollout.routes_to_candidate``).
    candidate: ServedModel | None = None
    fraction: float = 0.0

    @property
    def learner(self) -> Learner:
        """The spec's pure functions (cached per spec by ``make_learner``)."""
        return make_learner(self.spec)


def served_from_log(replayer: Any, model: Model) -> ServedModel:
    """What serves ``model`` per the log: its head, or during a rollout the champion
    (recorded as the serving version) with the candidate beside it."""
    if model.rollout is None:
        head = replayer.state_at(model.id, model.version)
        return _served(model, model.version, head.state, head.digest)
    champion = replayer.state_at(model.id, model.serving_version)
    candidate = replayer.state_at(model.id, model.rollout.candidate_version)
    return _served(model, model.serving_version, champion.state, champion.digest, (candidate.state, candidate.digest))


def served_by(learner: ModelLearner) -> ServedModel:
    """What a learner's model serves now: its head, or during a rollout the champion with
    the candidate (the learner's head state) beside it."""
    model = learner.model
    if model.rollout is None or learner.champion is None:
        return _served(model, learner.version, learner.state, learner.digest)
    state, digest = learner.champion
    return _served(model, model.serving_version, state, digest, (learner.state, learner.digest))


def _served(
    model: Model,
    version: int,
    state: LearnerState,
    digest: str,
    candidate: tuple[LearnerState, str] | None = None,
) -> ServedModel:
    arm = None
    if candidate is not None and model.rollout is not None:
        arm = ServedModel(
            model.id, model.name, model.spec, model.rollout.candidate_version, candidate[1], candidate[0], model.paused
        )
    return ServedModel(
        model.id,
        model.name,
        model.spec,
        version,
        digest,
        state,
        model.paused,
        candidate=arm,
        fraction=model.rollout.fraction if arm is not None and model.rollout is not None else 0.0,
    )


class ModelCatalog:
    """Served models by name.

    Reads are a dictionary lookup (no database round trip on the Predict path). A head
    is loaded by replay on first use and afterwards replaced only by ``publish``, which
    the learner loop and operator commands call once their events have committed.
    Versions only grow, so a slower concurrent load can never put an older head back.
    """

    def __init__(self, service: LedgerService):
        self.service = service
        self._by_name: dict[str, ServedModel] = {}
        self._load_lock = threading.Lock()
        self.changed = threading.Condition()

    def get(self, name: str) -> ServedModel:
        """The served head of a model. Raises ``ModelNotFoundError``."""
        served = self._by_name.get(name)
        if served is not None:
            return served
        with self._load_lock:
            served = self._by_name.get(name)
            if served is None:
                served = self.load(self.service.ledger.get_model(name))
        return served

    def load(self, model: Model) -> ServedModel:
        """Fold the model's serving state (and a rollout's candidate) from the log and publish it."""
        return self.publish(served_from_log(self.service.replayer, model))

    def publish(self, served: ServedModel) -> ServedModel:
        """Serve ``served`` unless a newer version is served already; returns the winner.

        A model's first head in this process also compiles the block scorer, so that the
        first unary predictions do not wait behind an XLA compile on the writer thread
        (measured: a 0.3–0.7 s stall of every in-flight call).
        """
        if served.name not in self._by_name:
            served.learner.predict_proba(served.state, np.zeros((SCORE_BLOCK, served.spec.n_features)))
        with self.changed:
            current = self._by_name.get(served.name)
            if current is not None and current.version > served.version:
                return current
            self._by_name[served.name] = served
            self.changed.notify_all()
        return served

    def peek(self, name: str) -> ServedModel | None:
        """The served head if loaded, without loading it."""
        return self._by_name.get(name)
