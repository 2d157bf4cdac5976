"""The ``Branch`` aggregate: a counterfactual replay of a model, recorded apart from it.

A branch re-folds a model's recorded batches without some labeled examples. It never
serves and never touches the ``Model`` aggregate: its own stream records what was
excluded, by whom, and what the replay produced, so an auditor can re-run it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, event

from domain.errors import InvalidArgumentError

BRANCH_NAMESPACE = uuid5(NAMESPACE_URL, "learnledger:branch")
MAX_RULE_LENGTH = 500


def excluded_digest(ids: Iterable[UUID]) -> str:
    """SHA-256 of the excluded prediction ids (16 bytes each, sorted): order-free."""
    h = hashlib.sha256()
    for pid in sorted(ids, key=lambda u: u.bytes):
        h.update(pid.bytes)
    return "sha256:" + h.hexdigest()


def branch_name(rule: str, from_version: int, digest: str) -> str:
    """The branch's name: what was excluded (rule and ids' digest) and where it starts."""
    return f"{rule} @v{from_version} {digest[:19]}"


def branch_id_for(model_id: UUID, name: str) -> UUID:
    """The branch's aggregate id: uuid5 of the model id and the branch name."""
    return uuid5(BRANCH_NAMESPACE, f"{model_id}/{name}")


class Branch(Aggregate):
    """One counterfactual history of a model: which examples it leaves out, and its replays."""

    class Created(Aggregate.Created):
        """The branch exists: model, branch point, exclusion rule and excluded ids' digest."""

        model_id: UUID
        name: str
        from_version: int
        rule: str
        excluded_count: int
        excluded_digest: str
        actor: str

    class Replayed(Aggregate.Event):
        """The branch was re-folded through ``through_version`` of the model's history."""

        through_version: int
        versions_folded: int
        batches_changed: int
        batches_skipped: int
        final_digest: str
        flipped: int
        actor: str

    @event(Created)
    def __init__(
        self,
        model_id: UUID,
        name: str,
        from_version: int,
        rule: str,
        excluded_count: int,
        excluded_digest: str,
        actor: str,
    ) -> None:
        self.model_id = model_id
        self.name = name
        self.from_version = from_version
        self.rule = rule
        self.excluded_count = excluded_count
        self.excluded_digest = excluded_digest
        self.replays = 0
        self.final_digest: str | None = None

    @staticmethod
    def create_id(model_id: UUID, name: str, **_: Any) -> UUID:
        """Aggregate id from the model and the branch name."""
        return branch_id_for(model_id, name)

    def record_replay(
        self,
        through_version: int,
        versions_folded: int,
        batches_changed: int,
        batches_skipped: int,
        final_digest: str,
        flipped: int,
        actor: str,
    ) -> None:
        """Record one replay of the branch.

        Raises:
            InvalidArgumentError: the replay ends before the branch point, or a count is negative.
        """
        if through_version < self.from_version:
            raise InvalidArgumentError(
                f"a replay of a branch from version {self.from_version} cannot end at {through_version}"
            )
        if min(versions_folded, batches_changed, batches_skipped, flipped) < 0:
            raise InvalidArgumentError("replay counts must be >= 0")
        self._replayed(through_version, versions_folded, batches_changed, batches_skipped, final_digest, flipped, actor)

    @event(Replayed)
    def _replayed(
        self,
        through_version: int,
        versions_folded: int,
        batches_changed: int,
        batches_skipped: int,
        final_digest: str,
        flipped: int,
        actor: str,
    ) -> None:
        self.replays += 1
        self.final_digest = final_digest


def open_branch(
    app: Application,
    model_id: UUID,
    *,
    from_version: int,
    rule: str,
    excluded: frozenset[UUID],
    actor: str,
) -> Branch:
    """The branch for this exclusion, created (not yet saved) if it does not exist yet.

    Raises:
        InvalidArgumentError: empty or overlong rule, or a branch point before version 1.
    """
    if not rule.strip() or len(rule) > MAX_RULE_LENGTH:
        raise InvalidArgumentError(f"a branch rule must be 1 to {MAX_RULE_LENGTH} characters")
    if from_version < 1:
        raise InvalidArgumentError(f"a branch starts at version 1 or later, not {from_version}")
    digest = excluded_digest(excluded)
    name = branch_name(rule, from_version, digest)
    try:
        found: Branch = app.repository.get(branch_id_for(model_id, name))
        return found
    except AggregateNotFoundError:
        return Branch(
            model_id=model_id,
            name=name,
            from_version=from_version,
            rule=rule,
            excluded_count=len(excluded),
            excluded_digest=digest,
            actor=actor,
        )
