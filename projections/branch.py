"""Counterfactual replay: the model's history without some labels, as a branch that never serves.

From version V (default 1) the recorded history is walked twice in lockstep by
``projections.refold``: once as recorded (each replayed digest is checked against the
log) and once without the excluded prediction ids (a batch left empty is skipped). At
every version the branch's state is compared with the real one, and every prediction the
real version served is re-scored with the branch's state at that same version: that is
the decision the service would have made, had those labels never arrived.

Metrics compare both histories on the labeled predictions served after the branch point
(the excluded examples' own labels left out, since they are the ones in question). Each
was scored before its label existed, so this is test-then-train evaluation — holdout-like,
but not a held-out set.

The result is recorded as ``Branch.Created`` (once per exclusion and branch point) and
``Branch.Replayed`` events through the ledger; nothing reaches the ``Model`` aggregate.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

import numpy as np
from eventsourcing.persistence import IntegrityError

from domain.branch import open_branch
from domain.errors import ConcurrencyError, VersionNotFoundError
from domain.ledger import Ledger
from domain.model import Model
from projections.audit_log import Feedback, Served, feedback, served_predictions
from projections.digest import state_digest
from projections.exclusion import Exclusion
from projections.learners import Learner, LearnerState, decide_rows
from projections.refold import Refolder, WeightChange, param_layout, params_vector, top_weight_changes
from projections.replay import Replayer, ReplayError

MAX_FLIPS_LISTED = 1000
SCHEMA = "learnledger.counterfactual/1"


@dataclass(frozen=True)
class Flip:
    """A recorded decision the branch would have made differently."""

    prediction_id: str
    version: int
    time: str
    logged_score: float
    logged_decision: float
    branch_score: float
    branch_decision: float
    label: float | None


@dataclass
class Scores:
    """Per-example loss and accuracy (classification) or mean absolute error (regression)."""

    labeled: int = 0
    loss: float | None = None
    accuracy: float | None = None
    mean_absolute_error: float | None = None


@dataclass
class CounterfactualResult:
    """What the branch changed: weights, metrics, and recorded decisions."""

    model: str
    branch_id: str
    branch_name: str
    rule: str
    excluded: int
    from_version: int
    through_version: int
    versions_folded: int
    batches_changed: int
    batches_skipped: int
    rows_dropped: int
    real_digest: str
    branch_digest: str
    first_divergent_version: int | None
    weight_change_norm: float
    weight_change_max: float
    top_weights: list[WeightChange]
    metrics_note: str
    real: Scores
    branch: Scores
    predictions_rescored: int
    mean_abs_score_change: float
    max_abs_score_change: float
    flipped: int
    flipped_to_correct: int
    flipped_to_wrong: int
    flips: list[Flip] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {"schema": SCHEMA, **asdict(self)}


def run_counterfactual(
    ledger: Ledger,
    replayer: Replayer,
    model_name: str,
    exclusion: Exclusion,
    *,
    from_version: int = 1,
    actor: str,
    top: int = 10,
) -> CounterfactualResult:
    """Replay ``model_name`` from ``from_version`` without ``exclusion.ids``; record the branch.

    Raises:
        ModelNotFoundError, VersionNotFoundError: unknown model or branch point.
        ReplayError: the recorded history itself does not replay to its digests.
    """
    model = ledger.get_model(model_name)
    if not 1 <= from_version <= model.version:
        raise VersionNotFoundError(f"model {model_name!r} has versions 1 to {model.version}, not {from_version}")
    refolder = Refolder(ledger, replayer, model)
    head = refolder.head_version
    learner = refolder.learner
    served: dict[int, list[Served]] = defaultdict(list)
    for row in served_predictions(ledger, model.id):
        if row.version > from_version:
            served[row.version].append(row)
    labels = feedback(ledger, model.id)
    tally = _Tally(exclusion.ids, labels)
    real_state = branch_state = refolder.state_at(from_version)
    counts = {"folded": 0, "changed": 0, "skipped": 0, "dropped": 0}
    first_divergent: int | None = None
    walks = zip(
        refolder.run(from_version, head, start_state=real_state),
        refolder.run(from_version, head, exclude=exclusion.ids, start_state=real_state),
        strict=True,
    )
    for real, branch in walks:
        counts["folded"] += 1
        counts["changed"] += int(branch.dropped > 0)
        counts["skipped"] += int(branch.skipped)
        counts["dropped"] += branch.dropped
        real_digest = state_digest(real.state)
        recorded = getattr(real.event, "digest", None)
        if recorded is not None and recorded != real_digest:
            raise ReplayError(f"version {real.version}: replayed digest {real_digest} differs from recorded {recorded}")
        same = state_digest(branch.state) == real_digest
        if not same and first_divergent is None:
            first_divergent = real.version
        tally.add(learner, served.pop(real.version, []), real.state, branch.state, same=same)
        real_state, branch_state = real.state, branch.state
    layout = param_layout(model.spec)
    before, after = params_vector(layout, real_state), params_vector(layout, branch_state)
    result = CounterfactualResult(
        model=model.name,
        branch_id="",
        branch_name="",
        rule=exclusion.rule,
        excluded=len(exclusion.ids),
        from_version=from_version,
        through_version=head,
        versions_folded=counts["folded"],
        batches_changed=counts["changed"],
        batches_skipped=counts["skipped"],
        rows_dropped=counts["dropped"],
        real_digest=state_digest(real_state),
        branch_digest=state_digest(branch_state),
        first_divergent_version=first_divergent,
        weight_change_norm=float(np.linalg.norm(after - before)),
        weight_change_max=float(np.max(np.abs(after - before))) if after.size else 0.0,
        top_weights=top_weight_changes(layout, before, after, top),
        metrics_note=(
            f"labeled predictions served by versions {from_version + 1}..{head}, excluded examples left out; "
            "each was scored before its label existed (test-then-train)"
        ),
        **tally.summary(model.spec.head),
    )
    _record(ledger, model, exclusion, result, actor)
    return result


class _Tally:
    """Running comparison of the real and branch scores of the recorded predictions."""

    def __init__(self, excluded: frozenset[UUID], labels: dict[UUID, Feedback]):
        self.excluded = excluded
        self.labels = labels
        self.losses: dict[str, list[float]] = {"real": [], "branch": []}
        self.hits: dict[str, list[float]] = {"real": [], "branch": []}
        self.deltas: list[float] = []
        self.flips: list[Flip] = []
        self.flipped = self.to_correct = self.to_wrong = 0

    def add(
        self, learner: Learner, rows: list[Served], real: LearnerState, branch: LearnerState, *, same: bool
    ) -> None:
        if not rows:
            return
        spec = learner.spec
        x = np.asarray([r.features for r in rows], np.float64)
        if same:
            # Identical state: the branch would have served exactly the logged scores.
            branch_scores = np.asarray([r.score for r in rows])
            branch_decisions = np.asarray([r.decision for r in rows])
        else:
            branch_scores, branch_decisions = decide_rows(spec, learner.predict_proba(branch, x))
        self.deltas.extend(np.abs(branch_scores - np.asarray([r.score for r in rows])).tolist())
        labeled = [
            i for i, r in enumerate(rows) if r.prediction_id in self.labels and r.prediction_id not in self.excluded
        ]
        for i, row in enumerate(rows):
            if spec.head == "regression" or branch_decisions[i] == row.decision:
                continue
            label = self.labels[row.prediction_id].label if row.prediction_id in self.labels else None
            # An excluded example's own label is the one in question: it judges nothing.
            judged = None if row.prediction_id in self.excluded else label
            self.flipped += 1
            self.to_correct += int(judged is not None and branch_decisions[i] == judged)
            self.to_wrong += int(judged is not None and row.decision == judged)
            if len(self.flips) < MAX_FLIPS_LISTED:
                self.flips.append(
                    Flip(
                        str(row.prediction_id),
                        row.version,
                        row.time.isoformat(),
                        row.score,
                        row.decision,
                        float(branch_scores[i]),
                        float(branch_decisions[i]),
                        label,
                    )
                )
        if not labeled:
            return
        xs = x[labeled]
        ys = np.asarray([self.labels[rows[i].prediction_id].label for i in labeled], np.float64)
        for name, state in (("real", real), ("branch", real if same else branch)):
            self.losses[name].extend(learner.losses(state, xs, ys).tolist())
            scores, decisions = decide_rows(spec, learner.predict_proba(state, xs))
            if spec.head == "regression":
                self.hits[name].extend(np.abs(scores - ys).tolist())
            else:
                self.hits[name].extend((decisions == ys).astype(np.float64).tolist())

    def summary(self, head: str) -> dict[str, Any]:
        def scores(name: str) -> Scores:
            n = len(self.losses[name])
            if not n:
                return Scores()
            hit = float(np.mean(self.hits[name]))
            return Scores(
                labeled=n,
                loss=float(np.mean(self.losses[name])),
                accuracy=None if head == "regression" else hit,
                mean_absolute_error=hit if head == "regression" else None,
            )

        return {
            "real": scores("real"),
            "branch": scores("branch"),
            "predictions_rescored": len(self.deltas),
            "mean_abs_score_change": float(np.mean(self.deltas)) if self.deltas else 0.0,
            "max_abs_score_change": float(np.max(self.deltas)) if self.deltas else 0.0,
            "flipped": self.flipped,
            "flipped_to_correct": self.to_correct,
            "flipped_to_wrong": self.to_wrong,
            "flips": self.flips,
        }


def _record(ledger: Ledger, model: Model, exclusion: Exclusion, result: CounterfactualResult, actor: str) -> None:
    # The branch's own stream: created once per exclusion and branch point, one
    # Replayed event per run (the model's history may have grown in between).
    branch = open_branch(
        ledger, model.id, from_version=result.from_version, rule=exclusion.rule, excluded=exclusion.ids, actor=actor
    )
    branch.record_replay(
        result.through_version,
        result.versions_folded,
        result.batches_changed,
        result.batches_skipped,
        result.branch_digest,
        result.flipped,
        actor,
    )
    try:
        ledger.save(branch)
    except IntegrityError:
        raise ConcurrencyError("the same branch was replayed concurrently; run it again") from None
    result.branch_id, result.branch_name = str(branch.id), branch.name
