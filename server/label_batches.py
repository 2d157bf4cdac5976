"""Validate and commit a batch of labels where each label may fail on its own."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast
from uuid import UUID

from domain.errors import ConcurrencyError, ConflictingLabelError, LedgerError
from domain.ledger import LabelOutcome, LabelRequest, Ledger

LabelResult = LabelOutcome | LedgerError


def commit_labels(
    ledger: Ledger, requests: Sequence[LabelRequest], *, received_at: datetime, attempts: int = 5
) -> list[LabelResult]:
    """Validate labels and commit every label event of the batch in one transaction.

    Args:
        ledger: the ledger to validate against and write to.
        requests: labels in arrival order.
        received_at: the time stamped on the label events.
        attempts: how many times to re-validate after losing a race to another writer.

    Returns:
        One result per request, in order: its ``LabelOutcome`` (its event, if any, is
        committed) or the domain error that refuses it (nothing was written for it).

    Raises:
        ConcurrencyError: other writers kept labeling the same predictions first.
    """
    for _ in range(attempts):
        results = validate_labels(ledger, requests, received_at=received_at)
        events = [r.event for r in results if isinstance(r, LabelOutcome) and r.event is not None]
        try:
            ledger.record(events)
        except ConcurrencyError:
            # Another writer (a gRPC server, a second ingester) labeled one of these
            # predictions after we validated; nothing of ours was written. Validating
            # again turns the repeat into DUPLICATE (or a conflict) and commits the rest.
            continue
        return results
    raise ConcurrencyError(f"labels kept being written by other writers; gave up after {attempts} attempts")


def validate_labels(ledger: Ledger, requests: Sequence[LabelRequest], *, received_at: datetime) -> list[LabelResult]:
    """``Ledger.prepare_labels`` with a result per request instead of one error for all.

    The whole batch is validated in one round trip; only when that raises is each label
    validated alone to find the refused ones, and the rest are validated together again
    (so a repeat within the batch is still DUPLICATE, as ``prepare_labels`` decides).

    Raises:
        ConcurrencyError: the log changed between the two passes; validate again.
    """
    try:
        return list(ledger.prepare_labels(requests, received_at=received_at))
    except LedgerError:
        pass
    results: list[LabelResult | None] = [None] * len(requests)
    for i, request in enumerate(requests):
        try:
            ledger.prepare_labels([request], received_at=received_at)
        except LedgerError as exc:
            results[i] = exc
    # An earlier label in the batch counts as recorded: a different one after it for the
    # same prediction conflicts, exactly as if they had arrived in separate batches.
    first: dict[UUID, float] = {}
    for i, request in enumerate(requests):
        if results[i] is None:
            earlier = first.setdefault(request.prediction_id, request.label)
            if earlier != request.label:
                results[i] = ConflictingLabelError(
                    f"prediction {request.prediction_id} was labeled {earlier:g} earlier in this batch; "
                    f"refusing {request.label:g}"
                )
    kept = [i for i, r in enumerate(results) if r is None]
    try:
        outcomes = ledger.prepare_labels([requests[i] for i in kept], received_at=received_at)
    except LedgerError as exc:
        raise ConcurrencyError(f"the log changed while labels were validated: {exc}") from None
    for i, outcome in zip(kept, outcomes, strict=True):
        results[i] = outcome
    # Every slot is filled now: refused ones above, the kept ones by this loop.
    return cast(list[LabelResult], results)
