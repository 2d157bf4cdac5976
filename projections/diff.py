"""Time-travel diff: which weights changed between two versions, and which batches and examples moved them.

Method (all in parameter space, float64 on the replayed float32 parameters):

* Total change ``Δ = θ(V2) − θ(V1)``; weights are ranked by ``|Δ_j|`` and named by layer,
  feature, hidden unit or class.
* Every version ``v`` in ``V1+1..V2`` changed the state by ``δ_v = θ(v) − θ(v−1)`` (zero for a
  pause or a rejected update; a rollback is a jump of its own). These steps telescope,
  ``Σ δ_v = Δ``, so their projections on the total change, ``c_v = ⟨δ_v, Δ⟩ / ‖Δ‖²``, sum
  to exactly 1: ``c_v`` is the share of the change (along its direction) that step made.
  Batches are ranked by ``c_v``; a negative share pushed against the final change.
* Within a top batch, example ``i``'s push is the component along ``Δ`` of its share of
  the descent direction at the pre-step state: ``p_i = ⟨−∇ℓ_i(θ(v−1)) / n, Δ⟩ / ‖Δ‖``
  with ``n`` the batch's rows and the standardisation the step itself used (the scaler
  after the batch). For SGD the step is ``−lr · (Σ_i ∇ℓ_i / n + l2·w)``, so
  ``lr · p_i / ‖Δ‖`` is example ``i``'s exact share of the total change (L2 shrinkage
  aside). For Adam and Adagrad the step is a preconditioned, momentum-carrying function
  of the gradients: ``p_i`` then ranks the examples to first order, and is not a share.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from uuid import UUID

import jax
import jax.numpy as jnp
import numpy as np

from domain.errors import InvalidArgumentError, VersionNotFoundError
from domain.ledger import Ledger
from domain.model import Model
from domain.spec import LearnerSpec
from projections.digest import state_digest
from projections.learners import LearnerState, StructuredState, example_losses, logits_fn, make_batch
from projections.refold import Refolder, param_layout, params_vector, top_weight_changes
from projections.replay import Replayer

SCHEMA = "learnledger.diff/1"
EXAMPLE_BATCHES = 3


@dataclass(frozen=True)
class StepShare:
    """One version's step between V1 and V2 and its share of the total change."""

    version: int
    kind: str  # "update" | "rollback"
    examples: int
    share: float
    step_norm: float
    time: str
    actor: str


@dataclass(frozen=True)
class ExamplePush:
    """One labeled example of a top batch: how far its gradient pushed along the change."""

    prediction_id: str
    label: float
    push: float
    alignment: float  # cosine between its descent direction and the total change
    sgd_share: float | None


def diff_versions(
    ledger: Ledger, replayer: Replayer, model_name: str, v1: int, v2: int, *, top: int = 10
) -> dict[str, Any]:
    """The diff of ``model_name`` between versions ``v1`` and ``v2`` as a JSON-ready mapping.

    Raises:
        ModelNotFoundError: unknown model.
        VersionNotFoundError: a version the model does not have.
        InvalidArgumentError: ``v1 > v2``.
    """
    model = ledger.get_model(model_name)
    for v in (v1, v2):
        if not 1 <= v <= model.version:
            raise VersionNotFoundError(f"model {model_name!r} has versions 1 to {model.version}, not {v}")
    if v1 > v2:
        raise InvalidArgumentError(f"V1 must not come after V2 (got {v1} > {v2})")
    refolder = Refolder(ledger, replayer, model)
    layout = param_layout(model.spec)
    first = refolder.state_at(v1)
    before = previous = params_vector(layout, first)
    steps: list[tuple[StepShare, np.ndarray]] = []
    final = first
    for step in refolder.run(v1, v2):
        now = params_vector(layout, step.state)
        if isinstance(step.event, (Model.UpdateApplied, Model.RolledBack)):
            kind = "update" if isinstance(step.event, Model.UpdateApplied) else "rollback"
            share = StepShare(
                step.version, kind, len(step.used), 0.0, 0.0, step.event.timestamp.isoformat(), step.event.actor
            )
            steps.append((share, now - previous))
        previous, final = now, step.state
    after = previous
    total = after - before
    norm2 = float(total @ total)
    ranked = sorted(
        (
            StepShare(
                s.version,
                s.kind,
                s.examples,
                float(d @ total) / norm2 if norm2 else 0.0,
                float(np.linalg.norm(d)),
                s.time,
                s.actor,
            )
            for s, d in steps
        ),
        key=lambda s: (-s.share, s.version),
    )
    top_updates = [s for s in ranked if s.kind == "update" and s.share > 0][:EXAMPLE_BATCHES] if norm2 else []
    states = _states_around(refolder, v1, first, {s.version for s in top_updates})
    examples = [
        {"version": s.version, "examples": [asdict(e) for e in _pushes(refolder, states, s.version, total, top)]}
        for s in top_updates
    ]
    return {
        "schema": SCHEMA,
        "model": model.name,
        "v1": v1,
        "v2": v2,
        "digest_v1": state_digest(first),
        "digest_v2": state_digest(final),
        "parameters": len(layout.names),
        "change_norm": float(np.sqrt(norm2)),
        "change_max": float(np.max(np.abs(total))) if total.size else 0.0,
        "top_weights": [asdict(w) for w in top_weight_changes(layout, before, after, top)],
        "updates": sum(1 for s, _ in steps if s.kind == "update"),
        "rollbacks": sum(1 for s, _ in steps if s.kind == "rollback"),
        "shares_sum": float(sum(s.share for s in ranked)),
        "batches": [asdict(s) for s in ranked[:top]],
        "top_batch_examples": examples,
        "optimizer": model.spec.optimizer,
        "method": (__doc__ or "").split("Method", 1)[-1].strip(),
        "weights_note": (
            "weights act on standardised inputs when the spec standardises (z = (x − mean) / sd); "
            "the running scaler itself is not a weight"
        ),
    }


def _states_around(refolder: Refolder, v1: int, first: LearnerState, versions: set[int]) -> dict[int, LearnerState]:
    """The states before and after each update in ``versions``, from a second walk (no state is kept twice)."""
    needed = {v for u in versions for v in (u - 1, u)}
    states = {v1: first} if v1 in needed else {}
    if versions:
        for step in refolder.run(v1, max(versions)):
            if step.version in needed:
                states[step.version] = step.state
    return states


@functools.lru_cache(maxsize=64)
def _example_gradients(spec: LearnerSpec) -> Callable[[LearnerState, jax.Array, jax.Array], jax.Array]:
    """Per-example gradients of the step's loss w.r.t. every packed float (jitted once per spec)."""
    logits = logits_fn(spec)

    def example_loss(floats: jax.Array, hybrid: LearnerState, row: jax.Array, label: jax.Array) -> jax.Array:
        state = LearnerState(hybrid.step, hybrid.ints, floats)
        return example_losses(spec, logits(state, row)[None, :], label[None])[0]

    @jax.jit
    def gradients(hybrid: LearnerState, x: jax.Array, y: jax.Array) -> jax.Array:
        return jax.vmap(jax.grad(example_loss), in_axes=(None, None, 0, 0))(hybrid.floats, hybrid, x, y)

    return gradients


def _pushes(
    refolder: Refolder, states: dict[int, LearnerState], version: int, total: np.ndarray, top: int
) -> list[ExamplePush]:
    """Per-example pushes of the update at ``version`` along ``total`` (see the module docstring)."""
    spec = refolder.model.spec
    learner = refolder.learner
    layout = param_layout(spec)
    ids: tuple[UUID, ...] = tuple(refolder.events[version - 1].prediction_ids)
    x, y = refolder.batch_examples(ids, version - 1)
    pre, post = learner.unpack(states[version - 1]), learner.unpack(states[version])
    # Pre-step parameters with the scaler the step standardised with (updated by the batch).
    hybrid = learner.pack(StructuredState(pre.step, pre.params, pre.opt_state, post.scaler))
    # Padded to the batch size so every batch reuses one compiled function.
    batch = make_batch(spec, x, y)
    grads = _example_gradients(spec)(hybrid, jnp.asarray(batch.x), jnp.asarray(batch.y))
    g = np.asarray(grads, np.float64)[: len(ids), layout.slots]
    norm = float(np.linalg.norm(total))
    descent = -g / len(ids)
    push = descent @ total / norm
    lengths = np.linalg.norm(descent, axis=1)
    alignment = np.divide(push, lengths, out=np.zeros_like(push), where=lengths > 0)
    order = np.argsort(-push, kind="stable")[:top]
    sgd = spec.optimizer == "sgd"
    return [
        ExamplePush(
            str(ids[i]),
            float(y[i]),
            float(push[i]),
            float(alignment[i]),
            float(spec.learning_rate * push[i] / norm) if sgd else None,
        )
        for i in order
    ]
