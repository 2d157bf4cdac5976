"""The serving use cases: predict and feedback through the group-commit writer.

The servicer converts protobuf to these calls and back; everything here speaks the
domain's vocabulary and raises the domain's errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

import numpy as np

from domain.errors import (
    ConcurrencyError,
    ConflictingPredictionError,
    InvalidArgumentError,
    LedgerError,
)
from domain.ids import new_prediction_id, prediction_id_for
from domain.ledger import LabelOutcome, LabelRequest, LabelStatus
from domain.prediction import Prediction, check_same_prediction, make_prediction_event
from domain.validation import require_features
from projections.learners import decide
from server.catalog import ModelCatalog, ServedModel
from server.errors import ResourceExhaustedError, status_for
from server.services import LedgerService
from server.writer import GroupCommitWriter

MAX_PREDICT_ROWS = 10_000
MAX_FEEDBACK_ITEMS = 10_000
MAX_REPORTED_ERRORS = 100
RETRIES_ON_CONFLICT = 3


@dataclass(frozen=True)
class PredictRow:
    """One row to score; ``key`` is the caller's optional idempotency key."""

    features: Sequence[float]
    key: str = ""


@dataclass(frozen=True)
class PredictResult:
    """What a committed prediction replies."""

    prediction_id: UUID
    score: float
    decision: float
    model_version: int
    params_digest: str


@dataclass
class FeedbackTally:
    """The running summary of a feedback stream."""

    accepted: int = 0
    duplicate: int = 0
    late: int = 0
    rejected: int = 0
    errors: list[tuple[int, str, str, str]] = field(default_factory=list)

    def count(self, outcomes: Iterable[LabelOutcome]) -> None:
        """Add committed outcomes."""
        for outcome in outcomes:
            if outcome.status is LabelStatus.ACCEPTED:
                self.accepted += 1
            elif outcome.status is LabelStatus.DUPLICATE:
                self.duplicate += 1
            else:
                self.late += 1

    def reject(self, index: int, request: LabelRequest | None, key: str, exc: BaseException) -> None:
        """Count a refused label, keeping the first few reasons."""
        self.rejected += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            pid = str(request.prediction_id) if request is not None else key
            self.errors.append((index, pid, status_for(exc).name, str(exc)))


class ServingService:
    """Predict and feedback use cases: validate → score → build events → group commit."""

    def __init__(self, service: LedgerService, writer: GroupCommitWriter, catalog: ModelCatalog):
        self.service = service
        self.ledger = service.ledger
        self.writer = writer
        self.catalog = catalog

    # --- predictions ---------------------------------------------------------------------

    def predict(self, model_name: str, rows: Sequence[PredictRow], actor: str) -> list[PredictResult]:
        """Score rows with the served head, commit one ``Prediction.Made`` each, reply after commit.

        A reused idempotency key with the same model and features returns the original
        prediction and writes nothing; with anything else it is ``ALREADY_EXISTS``.

        Raises:
            ModelNotFoundError, InvalidArgumentError, NonFiniteValueError,
            ConflictingPredictionError, ResourceExhaustedError.
        """
        if not rows:
            raise InvalidArgumentError("a prediction needs at least one row of features")
        if len(rows) > MAX_PREDICT_ROWS:
            raise ResourceExhaustedError(f"at most {MAX_PREDICT_ROWS} rows per call, got {len(rows)}")
        served = self.catalog.get(model_name)
        spec = served.spec
        x = _feature_matrix(rows, spec.n_features, model_name)
        pids = [prediction_id_for(row.key) if row.key else new_prediction_id() for row in rows]
        keyed = [pid for row, pid in zip(rows, pids, strict=True) if row.key]
        proba = served.learner.predict_proba(served.state, x)
        now = datetime.now(UTC)
        results: dict[UUID, PredictResult] = {}
        events: dict[UUID, Prediction.Made] = {}
        for i, pid in enumerate(pids):
            score, decision = decide(spec, proba[i])
            # make_prediction_event validates and converts each row once more; the
            # matrix check above only makes the common, valid case cheap.
            event = make_prediction_event(
                pid,
                model_id=served.model_id,
                model_name=model_name,
                model_version=served.version,
                spec=spec,
                features=rows[i].features,
                score=score,
                decision=decision,
                params_digest=served.digest,
                routing="champion",
                actor=actor,
                timestamp=now,
            )
            earlier = events.get(pid)
            if earlier is not None:
                if earlier.features != event.features:
                    raise ConflictingPredictionError(
                        f"prediction_id {rows[i].key!r} appears twice in the request with different features"
                    )
                continue  # the same key twice with the same features: one prediction
            events[pid] = event
            results[pid] = PredictResult(pid, score, decision, served.version, served.digest)
        self._commit_predictions(served, events, results, keyed)
        return [results[pid] for pid in pids]

    def _commit_predictions(
        self,
        served: ServedModel,
        events: dict[UUID, Prediction.Made],
        results: dict[UUID, PredictResult],
        keyed: list[UUID],
    ) -> None:
        # Optimistic: no read before the write. A taken id surfaces as ConcurrencyError
        # (the writer isolates it from other callers); only then is the original read.
        for _ in range(RETRIES_ON_CONFLICT):
            try:
                self.writer.commit(list(events.values()))
                return
            except ConcurrencyError:
                if not keyed:
                    raise
                existing = self.ledger.get_predictions(pid for pid in keyed if pid in events)
                if not existing:
                    raise
                for pid, original in existing.items():
                    check_same_prediction(original, served.model_id, events[pid].features)
                    results[pid] = PredictResult(
                        pid, original.score, original.decision, original.model_version, original.params_digest
                    )
                    del events[pid]
                if not events:
                    return
        raise ConcurrencyError("predictions kept conflicting with concurrent writers; try again")

    # --- feedback --------------------------------------------------------------------------

    def feedback(self, requests: Sequence[LabelRequest]) -> list[LabelOutcome]:
        """Validate labels, commit them, and reply with each one's status after commit.

        Raises:
            PredictionNotFoundError, ConflictingLabelError, InvalidArgumentError,
            ResourceExhaustedError.
        """
        if len(requests) > MAX_FEEDBACK_ITEMS:
            raise ResourceExhaustedError(f"at most {MAX_FEEDBACK_ITEMS} labels per call, got {len(requests)}")
        for _ in range(RETRIES_ON_CONFLICT):
            outcomes = self.ledger.prepare_labels(requests, received_at=datetime.now(UTC))
            try:
                self.writer.commit([o.event for o in outcomes if o.event is not None])
            except ConcurrencyError:
                # A racing label for the same prediction committed first: validating
                # again turns an identical one into DUPLICATE and a different one into
                # ALREADY_EXISTS.
                continue
            return outcomes
        raise ConcurrencyError("labels kept conflicting with concurrent writers; try again")

    def feedback_stream(self, chunks: Iterable[list[tuple[int, LabelRequest | None, str, BaseException | None]]],
                        *, in_flight: int = 4) -> FeedbackTally:
        """Ingest a stream of label chunks; bad labels are counted, the stream goes on.

        Each chunk item is ``(index, request, key, error)``: ``error`` is a conversion
        error found before validation. At most ``in_flight`` chunks wait for the writer
        at once, so a fast client is slowed to the commit rate (flow control: the gRPC
        window fills while the server stops reading).
        """
        tally = FeedbackTally()
        pending: list[tuple[list[tuple[int, LabelRequest]], list[LabelOutcome], Future[list[int]]]] = []
        for chunk in chunks:
            good: list[tuple[int, LabelRequest]] = []
            for index, request, key, error in chunk:
                if error is not None or request is None:
                    tally.reject(index, request, key, error or InvalidArgumentError("bad label"))
                else:
                    good.append((index, request))
            if not good:
                continue
            outcomes, good = self._prepare_chunk(good, tally)
            future = self.writer.submit([o.event for o in outcomes if o.event is not None])
            pending.append((good, outcomes, future))
            while len(pending) >= in_flight:
                self._settle(pending.pop(0), tally)
        for item in pending:
            self._settle(item, tally)
        return tally

    def _prepare_chunk(
        self, good: list[tuple[int, LabelRequest]], tally: FeedbackTally
    ) -> tuple[list[LabelOutcome], list[tuple[int, LabelRequest]]]:
        now = datetime.now(UTC)
        try:
            return self.ledger.prepare_labels([r for _, r in good], received_at=now), good
        except LedgerError:
            pass
        # Rare path: find the bad labels one by one, then prepare the rest together so
        # that repeats inside the chunk are still recognised as duplicates.
        kept: list[tuple[int, LabelRequest]] = []
        for index, request in good:
            try:
                self.ledger.prepare_labels([request], received_at=now)
            except LedgerError as exc:
                tally.reject(index, request, "", exc)
            else:
                kept.append((index, request))
        try:
            return self.ledger.prepare_labels([r for _, r in kept], received_at=now), kept
        except LedgerError as exc:  # in-chunk conflicting labels: refuse the later ones
            return self._prepare_one_by_one(kept, tally, exc)

    def _prepare_one_by_one(
        self, kept: list[tuple[int, LabelRequest]], tally: FeedbackTally, _: BaseException
    ) -> tuple[list[LabelOutcome], list[tuple[int, LabelRequest]]]:
        accepted: list[tuple[int, LabelRequest]] = []
        outcomes: list[LabelOutcome] = []
        for index, request in kept:
            try:
                trial = self.ledger.prepare_labels([r for _, r in accepted] + [request], received_at=datetime.now(UTC))
            except LedgerError as exc:
                tally.reject(index, request, "", exc)
                continue
            accepted.append((index, request))
            outcomes = trial
        return outcomes, accepted

    def _settle(
        self,
        item: tuple[list[tuple[int, LabelRequest]], list[LabelOutcome], Future[list[int]]],
        tally: FeedbackTally,
    ) -> None:
        good, outcomes, future = item
        try:
            future.result()
        except ConcurrencyError:
            # Another caller labeled one of these first: redo this chunk label by label.
            for index, request in good:
                try:
                    tally.count(self.feedback([request]))
                except LedgerError as exc:
                    tally.reject(index, request, "", exc)
            return
        tally.count(outcomes)


def _feature_matrix(rows: Sequence[PredictRow], n_features: int, model_name: str) -> np.ndarray:
    """All rows as one float64 matrix; a bad row raises the domain's precise error."""
    if all(len(row.features) == n_features for row in rows):
        x = np.asarray([row.features for row in rows], dtype=np.float64)
        if np.isfinite(x).all():
            return x
    for row in rows:  # rare path: name the first bad row exactly as the domain does
        require_features(row.features, n_features, model_name)
    raise InvalidArgumentError("features must be finite numbers")
