"""Re-folding a stretch of a model's recorded history, optionally without some examples.

The time-travel tools (``diff``, ``counterfactual``, the model report's change figures)
all walk the recorded versions one by one. They use the same jitted step replay and the
live learner use (``make_learner(spec).update_step``) on the same recorded batches in the
same order: a batch only loses the excluded rows (``make_batch`` pads to the fixed batch
size, so a smaller batch runs the same compiled step), and a batch left empty is skipped.
Excluding nothing is therefore replay, bit for bit (tested against the recorded digests).

This module also names every parameter (layer, feature, unit or class) and maps it to
its slot in the packed ``LearnerState.floats``, so changes can be reported weight by weight.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import jax.numpy as jnp
import numpy as np

from domain.ledger import Ledger
from domain.model import STATE_KEEPING_EVENTS, Model
from domain.prediction import Prediction
from domain.spec import LearnerSpec
from projections.learners import LearnerState, make_batch, make_learner
from projections.rebaseline import refit
from projections.replay import PREFETCH_UPDATES, Replayer, UnknownEventError, examples_for

MAX_EXACT_SLOTS = 2**24  # float32 holds every integer below this exactly (the slot probe)


@dataclass(frozen=True)
class FoldStep:
    """The state after one recorded event, and what the step actually used."""

    version: int
    event: Any
    state: LearnerState
    used: tuple[UUID, ...]  # the batch rows stepped on ((): no step at this version)
    dropped: int  # rows of the recorded batch that were excluded
    skipped: bool  # the recorded batch lost every row, so no step was taken


@dataclass(frozen=True)
class ParamLayout:
    """Every parameter's name and its slot in ``LearnerState.floats``, in a fixed order."""

    names: tuple[str, ...]
    slots: np.ndarray  # int64 [n_params]
    is_weight: np.ndarray  # bool [n_params]: False for biases


class Refolder:
    """Walks one model's recorded events from a version, re-running each recorded step."""

    def __init__(self, ledger: Ledger, replayer: Replayer, model: Model):
        self.ledger = ledger
        self.replayer = replayer
        self.model = model
        self.learner = make_learner(model.spec)
        self.events: list[Any] = ledger.get_model_events(model.id)
        self._cache: dict[UUID, Prediction] = {}

    @property
    def head_version(self) -> int:
        """The newest version at the time the events were read."""
        return len(self.events)

    def state_at(self, version: int) -> LearnerState:
        """The real (recorded) state at ``version``, by the replayer (snapshots allowed)."""
        return self.replayer.state_at(self.model.id, version).state

    def batch_examples(self, ids: tuple[UUID, ...], index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Features as used and labels of a batch's rows, in order (fetched in bulk).

        Args:
            ids: the prediction ids.
            index: position in ``events`` of the update being folded (for prefetching).
        """
        if any(pid not in self._cache for pid in ids):
            self._prefetch(ids, index)
        return examples_for(self.ledger, self.model.id, self.model.spec, ids, self._cache)

    def run(
        self,
        start: int,
        end: int | None = None,
        *,
        exclude: frozenset[UUID] = frozenset(),
        start_state: LearnerState | None = None,
    ) -> Iterator[FoldStep]:
        """Yield the state after every version ``start + 1``..``end`` (default: head).

        The walk starts from the real state at ``start``. A rollback to T takes the
        walk's own state at T when T ≥ ``start``, else the real state at T (before
        ``start`` nothing was excluded, so the two agree). ``start_state``, when given,
        must be the real state at ``start`` (it saves replaying to it again).

        Raises:
            ReplayError: a recorded batch names a missing, unlabeled or late example.
        """
        last = self.head_version if end is None else end
        state = self.state_at(start) if start_state is None else start_state
        window = self.events[start:last]
        targets = {e.to_version for e in window if isinstance(e, (Model.RolledBack, Model.RolloutAborted))}
        kept: dict[int, LearnerState] = {start: state} if start in targets else {}
        spec = self.model.spec
        for index, event in enumerate(window, start=start):
            version = event.originator_version
            used: tuple[UUID, ...] = ()
            dropped, skipped = 0, False
            match event:
                case Model.UpdateApplied(prediction_ids=ids, replayed_ids=replayed):
                    ids = (*ids, *replayed)
                    used = tuple(pid for pid in ids if pid not in exclude)
                    dropped = len(ids) - len(used)
                    if used:
                        x, y = self.batch_examples(used, index)
                        state, _ = self.learner.update_step(state, make_batch(spec, x, y))
                    else:
                        skipped = True
                case Model.Rebaselined(prediction_ids=ids, epochs=epochs):
                    used = tuple(pid for pid in ids if pid not in exclude)
                    dropped = len(ids) - len(used)
                    x, y = self.batch_examples(used, index)
                    state = refit(spec, self.learner, x, y, epochs)
                case Model.RolledBack(to_version=target) | Model.RolloutAborted(to_version=target):
                    state = kept[target] if target in kept else self.state_at(target)
                case _ if isinstance(event, STATE_KEEPING_EVENTS):
                    pass
                case _:
                    raise UnknownEventError(f"version {version}: no fold rule for {type(event).__name__}")
            if version in targets:
                kept[version] = state
            yield FoldStep(version, event, state, used, dropped, skipped)

    def _prefetch(self, ids: tuple[UUID, ...], index: int) -> None:
        # One query for the next PREFETCH_UPDATES updates' examples, as replay does.
        wanted = list(ids)
        taken = 0
        for event in self.events[index:]:
            if isinstance(event, Model.UpdateApplied):
                wanted.extend(event.prediction_ids)
                taken += 1
                if taken >= PREFETCH_UPDATES:
                    break
        if len(self._cache) > 50_000:
            self._cache.clear()  # bounded memory on long walks
        self._cache.update(self.ledger.get_predictions(wanted))


@functools.lru_cache(maxsize=64)
def param_layout(spec: LearnerSpec) -> ParamLayout:
    """Names and packed-state slots of every parameter of a spec.

    The slots are found by unpacking a probe state whose floats are their own indices
    (packing is pure slicing, so each parameter receives exactly its slot number).
    """
    learner = make_learner(spec)
    init = learner.init()
    size = int(init.floats.shape[0])
    if size >= MAX_EXACT_SLOTS:
        raise ValueError(f"a state of {size} floats is too large to name weight by weight")
    probe = LearnerState(init.step, init.ints, jnp.arange(size, dtype=jnp.float32))
    params = learner.unpack(probe).params
    names: list[str] = []
    slots: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    n_layers = len(params) // 2
    for key in sorted(params):
        index = np.asarray(params[key]).astype(np.int64)
        layer = int(key.split("_")[1])
        if key.endswith("_w"):
            names.extend(
                _weight_name(spec, layer, n_layers, i, o) for i in range(index.shape[0]) for o in range(index.shape[1])
            )
        else:
            names.extend(_bias_name(spec, layer, n_layers, o) for o in range(index.shape[0]))
        slots.append(index.reshape(-1))
        weights.append(np.full(index.size, key.endswith("_w")))
    return ParamLayout(tuple(names), np.concatenate(slots), np.concatenate(weights))


def params_vector(layout: ParamLayout, state: LearnerState) -> np.ndarray:
    """The state's parameters as one float64 vector, in ``layout`` order."""
    return np.asarray(state.floats, np.float64)[layout.slots]


@dataclass(frozen=True)
class WeightChange:
    """One named parameter before and after, and by how much it moved."""

    name: str
    before: float
    after: float
    delta: float


def top_weight_changes(layout: ParamLayout, before: np.ndarray, after: np.ndarray, k: int) -> list[WeightChange]:
    """The ``k`` parameters that moved most (largest ``|after - before|``; ties in layout order)."""
    delta = after - before
    order = np.argsort(-np.abs(delta), kind="stable")[:k]
    return [
        WeightChange(layout.names[i], float(before[i]), float(after[i]), float(delta[i]))
        for i in order
        if delta[i] != 0.0
    ]


def _unit(spec: LearnerSpec, layer: int, index: int) -> str:
    # The inputs of layer 0 are the features; of layer L > 0, hidden layer L's units.
    return spec.feature_names[index] if layer == 0 else f"h{layer}[{index}]"


def _output(spec: LearnerSpec, layer: int, n_layers: int, index: int) -> str:
    if layer < n_layers - 1:
        return f"h{layer + 1}[{index}]"
    return f"class {index}" if spec.head == "multiclass" else "output"


def _weight_name(spec: LearnerSpec, layer: int, n_layers: int, i: int, o: int) -> str:
    if n_layers == 1 and spec.n_outputs == 1:
        return f"weight {spec.feature_names[i]}"
    prefix = f"layer {layer} " if n_layers > 1 else ""
    return f"{prefix}weight {_unit(spec, layer, i)} → {_output(spec, layer, n_layers, o)}"


def _bias_name(spec: LearnerSpec, layer: int, n_layers: int, o: int) -> str:
    if n_layers == 1 and spec.n_outputs == 1:
        return "bias"
    prefix = f"layer {layer} " if n_layers > 1 else ""
    return f"{prefix}bias {_output(spec, layer, n_layers, o)}"
