"""The serving use cases: predict and feedback through the group-commit writer.

The servicer converts protobuf to these calls and back; everything here speaks the
domain's vocabulary and raises the domain's errors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from typing import Any, NamedTuple
from uuid import UUID

import numpy as np

from domain.errors import (
    ConcurrencyError,
    ConflictingPredictionError,
    InvalidArgumentError,
    LedgerError,
)
from domain.ids import new_prediction_ids, prediction_id_for
from domain.ledger import LabelOutcome, LabelRequest, LabelStatus
from domain.prediction import Prediction, check_same_prediction, make_prediction_event
from domain.validation import require_features
from projections.learners import decide_rows
from projections.rollout import routes_to_candidate
from server.catalog import SCORE_BLOCK, ModelCatalog, ServedModel
from server.errors import ResourceExhaustedError, status_for
from server.services import LedgerService
from server.writer import GroupCommitWriter, Submission, Ticket

MAX_PREDICT_ROWS = 10_000
MAX_FEEDBACK_ITEMS = 10_000
MAX_REPORTED_ERRORS = 100
RETRIES_ON_CONFLICT = 3
# Calls with at most this many rows (and no idempotency keys) are scored on the writer
# thread, many calls per predict_proba; larger ones are scored by their own thread.
DEFERRED_MAX_ROWS = 16
# Per generation (two are kept, so 262k–524k recent predictions): ~130 bytes an entry,
# i.e. at most ~70 MB. Labels for older predictions are validated from the log.
RECENT_PREDICTIONS = 262_144


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
class Predictions:
    """Committed predictions as columns, one entry per request row, in order.

    Columns instead of one object per row: a 256-row call replies without building 256
    result objects. ``model_version`` and ``params_digest`` hold one value for every row
    unless an idempotent retry returned an older prediction (then they become lists).
    """

    ids: list[UUID]
    scores: list[float]
    decisions: list[float]
    model_version: int | list[int]
    params_digest: str | list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def versions(self) -> list[int]:
        """The model version of every row."""
        v = self.model_version
        return v if isinstance(v, list) else [v] * len(self.ids)

    def digests(self) -> list[str]:
        """The params digest of every row."""
        d = self.params_digest
        return d if isinstance(d, list) else [d] * len(self.ids)

    def result(self, i: int) -> PredictResult:
        """Row ``i`` as one object."""
        return PredictResult(self.ids[i], self.scores[i], self.decisions[i], self.versions()[i], self.digests()[i])


@dataclass
class _PredictJob:
    """Unary predictions waiting to be scored together on the writer thread."""

    served: ServedModel
    model_name: str
    features: list[tuple[float, ...]]
    ids: list[UUID]
    actor: str
    now: datetime
    predictions: Predictions | None = None
    events: list[Prediction.Made] = field(default_factory=list)


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
        writer.builder = self.build_jobs
        self.recent = RecentPredictions()
        writer.add_listener(self.recent.on_commit)

    # --- predictions ---------------------------------------------------------------------

    def predict(self, model_name: str, rows: Sequence[PredictRow], actor: str) -> list[PredictResult]:
        """``predict_rows`` for row objects, one result object per row."""
        out = self.predict_rows(model_name, [r.features for r in rows], [r.key for r in rows], actor)
        return list(map(PredictResult, out.ids, out.scores, out.decisions, out.versions(), out.digests()))

    def predict_one(self, model_name: str, features: Sequence[float], key: str, actor: str) -> Predictions:
        """``predict_rows(model_name, (features,), (key,), actor)`` for a unary Predict.

        The same deferred path (scored on the writer thread, reply after commit) without
        the batch bookkeeping (key lists, id iterators, row scans) that a single row does
        not need. Anything but a well-formed row of floats takes ``predict_rows``, which
        raises the precise error.

        Raises:
            ModelNotFoundError, InvalidArgumentError, NonFiniteValueError,
            ConflictingPredictionError, ResourceExhaustedError.
        """
        served = self.catalog.get(model_name)
        row = tuple(features)
        if len(row) != served.spec.n_features or not row or type(row[0]) is not float:
            return self.predict_rows(model_name, (features,), (key,), actor)
        try:
            if not all(map(math.isfinite, row)):
                return self.predict_rows(model_name, (features,), (key,), actor)
        except TypeError:
            return self.predict_rows(model_name, (features,), (key,), actor)
        pid = prediction_id_for(key) if key else new_prediction_ids(1)[0]
        job = _PredictJob(served, model_name, [row], [pid], actor, datetime.now(UTC))
        try:
            self.writer.submit_job(job, 1, contended=bool(key)).result()
        except ConcurrencyError:
            # The idempotency key was used before: find out whether this is a retry.
            if not key or job.predictions is None:
                raise
            self._commit_predictions(served, job.events, job.predictions, [pid], conflicted=True)
        assert job.predictions is not None
        return job.predictions

    def predict_rows(
        self, model_name: str, features: Sequence[Sequence[float]], keys: Sequence[str] | None, actor: str
    ) -> Predictions:
        """Score rows with the served head, commit one ``Prediction.Made`` each, reply after commit.

        A reused idempotency key with the same model and features returns the original
        prediction and writes nothing; with anything else it is ``ALREADY_EXISTS``.

        A few rows (a unary Predict) are scored on the writer thread together with every
        other call's rows committed in the same transaction (one ``predict_proba`` for
        all of them); many rows are scored and encoded here, while the writer commits.

        Raises:
            ModelNotFoundError, InvalidArgumentError, NonFiniteValueError,
            ConflictingPredictionError, ResourceExhaustedError.
        """
        n = len(features)
        if not n:
            raise InvalidArgumentError("a prediction needs at least one row of features")
        if n > MAX_PREDICT_ROWS:
            raise ResourceExhaustedError(f"at most {MAX_PREDICT_ROWS} rows per call, got {n}")
        served = self.catalog.get(model_name)
        spec = served.spec
        rows = _checked_rows(features, spec.n_features, model_name)
        if keys is not None and any(keys):
            ids = [prediction_id_for(k) if k else None for k in keys]
            fresh = iter(new_prediction_ids(ids.count(None)))
            pids = [pid if pid is not None else next(fresh) for pid in ids]
            keyed = [pid for pid, k in zip(pids, keys, strict=True) if k]
        else:
            pids = new_prediction_ids(n)
            keyed = []
        now = datetime.now(UTC)
        if n <= DEFERRED_MAX_ROWS and (not keyed or len(set(pids)) == n):
            job = _PredictJob(served, model_name, rows, pids, actor, now)
            try:
                self.writer.submit_job(job, n, contended=bool(keyed)).result()
            except ConcurrencyError:
                # An idempotency key was used before: find out whether it is a retry.
                if not keyed or job.predictions is None:
                    raise
                self._commit_predictions(served, job.events, job.predictions, keyed, conflicted=True)
            assert job.predictions is not None
            return job.predictions
        x = np.asarray(rows, dtype=np.float64)
        events, out = _build_predictions(served, model_name, rows, x, pids, actor, now)
        if keyed:
            events = _dedupe_keyed(events, rows, keys or ())
        self._commit_predictions(served, events, out, keyed)
        return out

    def build_jobs(self, submissions: list[Submission]) -> None:
        """Writer builder: score every queued unary prediction of a transaction at once.

        Jobs scored from the same served head share one ``predict_proba`` call; each
        job's events and rows are attached to its submission (a job that cannot be
        built fails alone).
        """
        groups: dict[int, list[Submission]] = {}
        for sub in submissions:
            groups.setdefault(id(sub.job.served), []).append(sub)
        for subs in groups.values():
            jobs: list[_PredictJob] = [sub.job for sub in subs]
            served = jobs[0].served
            rows = [f for job in jobs for f in job.features]
            try:
                scores, decisions = decide_rows(served.spec, _score_blocks(served, rows))
            except Exception as exc:
                for sub in subs:
                    sub.future.set_exception(exc)
                continue
            offset = 0
            for sub, job in zip(subs, jobs, strict=True):
                k = len(job.features)
                try:
                    events, job.predictions = _made_events(
                        served,
                        job.model_name,
                        job.features,
                        job.ids,
                        scores[offset : offset + k],
                        decisions[offset : offset + k],
                        job.actor,
                        job.now,
                    )
                    sub.rows = self.writer.encode(events)
                    sub.events = job.events = events
                except Exception as exc:
                    sub.future.set_exception(exc)
                offset += k

    def _commit_predictions(
        self,
        served: ServedModel,
        events: list[Prediction.Made],
        out: Predictions,
        keyed: list[UUID],
        *,
        conflicted: bool = False,
    ) -> None:
        # Optimistic: no read before the write. A taken id surfaces as ConcurrencyError
        # (the writer isolates it from other callers); only then is the original read.
        # ``conflicted``: the first attempt was made (and refused) already.
        rows = None if conflicted else self.writer.encode(events)
        for _ in range(RETRIES_ON_CONFLICT):
            if not conflicted:
                try:
                    self.writer.submit(events, rows, contended=bool(keyed)).result()
                    return
                except ConcurrencyError:
                    if not keyed:
                        raise
            conflicted = False
            pending = {e.originator_id: e for e in events}
            existing = self.ledger.get_predictions(pid for pid in keyed if pid in pending)
            if not existing:
                raise ConcurrencyError("a stream position was taken by another writer; try again")
            versions, digests = out.versions(), out.digests()
            for i, pid in enumerate(out.ids):
                original = existing.get(pid)
                if original is None:
                    continue
                if pid in pending:
                    check_same_prediction(original, served.model_id, pending.pop(pid).features)
                out.scores[i], out.decisions[i] = original.score, original.decision
                versions[i], digests[i] = original.model_version, original.params_digest
            out.model_version, out.params_digest = versions, digests
            events = list(pending.values())
            rows = None
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
        use_index = True
        for _ in range(RETRIES_ON_CONFLICT):
            outcomes = self._prepare_labels(requests, datetime.now(UTC), use_index=use_index)
            try:
                self.writer.submit([o.event for o in outcomes if o.event is not None], contended=True).result()
            except ConcurrencyError:
                # A racing label for the same prediction committed first: validating
                # again, from the log, turns an identical one into DUPLICATE and a
                # different one into ALREADY_EXISTS.
                self.recent.forget(r.prediction_id for r in requests)
                use_index = False
                continue
            return outcomes
        raise ConcurrencyError("labels kept conflicting with concurrent writers; try again")

    def feedback_stream(
        self, chunks: Iterable[list[tuple[int, LabelRequest | None, str, BaseException | None]]], *, in_flight: int = 4
    ) -> FeedbackTally:
        """Ingest a stream of label chunks; bad labels are counted, the stream goes on.

        Each chunk item is ``(index, request, key, error)``: ``error`` is a conversion
        error found before validation. At most ``in_flight`` chunks wait for the writer
        at once, so a fast client is slowed to the commit rate (flow control: the gRPC
        window fills while the server stops reading).
        """
        tally = FeedbackTally()
        pending: list[tuple[list[tuple[int, LabelRequest]], list[LabelOutcome], Ticket]] = []
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
            events = [o.event for o in outcomes if o.event is not None]
            # Encoded here, while the writer commits the previous chunks.
            # Not marked contended: a stream's chunks rarely race, and the writer's check
            # costs more than the rare bisection it saves (a conflict is still caught by
            # the primary key, and _settle re-validates the chunk label by label).
            future = self.writer.submit(events, self.writer.encode(events))
            pending.append((good, outcomes, future))
            while len(pending) >= in_flight:
                self._settle(pending.pop(0), tally)
        for item in pending:
            self._settle(item, tally)
        return tally

    def _prepare_labels(
        self, requests: Sequence[LabelRequest], now: datetime, *, use_index: bool = True
    ) -> list[LabelOutcome]:
        """``Ledger.prepare_labels``, told about the predictions this server committed recently.

        Those need no read: their model, time and (absent) label are known from the
        commit. Any other prediction, and every one with a label, is read from the log.
        """
        pending = self.recent.lookup(r.prediction_id for r in requests) if use_index else None
        return self.ledger.prepare_labels(requests, received_at=now, pending=pending)

    def _prepare_chunk(
        self, good: list[tuple[int, LabelRequest]], tally: FeedbackTally
    ) -> tuple[list[LabelOutcome], list[tuple[int, LabelRequest]]]:
        now = datetime.now(UTC)
        try:
            return self._prepare_labels([r for _, r in good], now), good
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
        item: tuple[list[tuple[int, LabelRequest]], list[LabelOutcome], Ticket],
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


class _MadeFacts(NamedTuple):
    """What label validation reads from a ``Prediction.Made`` (duck-typed for ``pending``)."""

    model_id: UUID
    timestamp: datetime


class RecentPredictions:
    """Recently committed, not yet labeled predictions of this server: label checks without a read.

    Filled by a writer listener after each commit, so an entry always names a committed
    prediction. A committed label (or default label) removes its entry (the log then decides, and says
    DUPLICATE or ALREADY_EXISTS); a label another process committed is caught by the
    primary key at commit, after which the caller re-validates from the log. Bounded:
    two generations of ``size`` entries, the older dropped whole.
    """

    def __init__(self, size: int = RECENT_PREDICTIONS):
        self.size = size
        self._young: dict[int, _MadeFacts] = {}
        self._old: dict[int, _MadeFacts] = {}

    def on_commit(self, events: Sequence[Any], _ids: Sequence[int]) -> None:
        """Writer listener (writer thread)."""
        young, old = self._young, self._old
        made = Prediction.Made
        # Keyed by the id's 128-bit int: UUID.__hash__ is Python code, int hashing is not.
        for event in events:
            if type(event) is made:
                young[event.originator_id.int] = _MadeFacts(event.model_id, event.timestamp)
            else:  # a label, a default label (or a model event: not in here anyway)
                key = event.originator_id.int
                young.pop(key, None)
                old.pop(key, None)
        if len(young) >= self.size:
            self._old, self._young = young, {}

    def lookup(self, prediction_ids: Iterable[UUID]) -> dict[UUID, Any]:
        """Facts of the given predictions that are known here, by id."""
        young, old = self._young, self._old
        out: dict[UUID, Any] = {}
        for pid in prediction_ids:
            key = pid.int
            found = young.get(key) or old.get(key)
            if found is not None:
                out[pid] = found
        return out

    def forget(self, prediction_ids: Iterable[UUID]) -> None:
        """Drop entries (after a conflict: the log knows better)."""
        for pid in prediction_ids:
            self._young.pop(pid.int, None)
            self._old.pop(pid.int, None)


def _checked_rows(features: Sequence[Sequence[float]], n_features: int, model_name: str) -> list[tuple[float, ...]]:
    """Every row as a tuple of floats, checked as ``require_features`` checks one.

    The common, valid case costs one ``tuple`` per row and one C-level finiteness scan
    over all values; a bad row is named exactly as the domain names it.
    """
    rows = [tuple(f) for f in features]
    if all(len(r) == n_features for r in rows):
        try:
            if all(map(math.isfinite, chain.from_iterable(rows))):
                # repeated double fields already hold floats; anything else is converted
                if all(type(v) is float for v in rows[0]):
                    return rows
                return [tuple(map(float, r)) for r in rows]
        except TypeError:
            pass
    for r in features:  # rare path: the domain's own check raises the precise error
        require_features(r, n_features, model_name)
    raise InvalidArgumentError("features must be finite numbers")


def _score_blocks(served: ServedModel, rows: list[tuple[float, ...]]) -> np.ndarray:
    """``predict_proba`` of ``rows`` in zero-padded blocks of ``SCORE_BLOCK`` rows (one compiled shape)."""
    n = len(rows)
    out = []
    for start in range(0, n, SCORE_BLOCK):
        part = rows[start : start + SCORE_BLOCK]
        block = np.zeros((SCORE_BLOCK, served.spec.n_features), dtype=np.float64)
        block[: len(part)] = part
        out.append(served.learner.predict_proba(served.state, block)[: len(part)])
    return out[0] if len(out) == 1 else np.concatenate(out)


def _build_predictions(
    served: ServedModel,
    model_name: str,
    rows: list[tuple[float, ...]],
    x: np.ndarray,
    pids: list[UUID],
    actor: str,
    now: datetime,
) -> tuple[list[Prediction.Made], Predictions]:
    proba = served.learner.predict_proba(served.state, x)
    scores, decisions = decide_rows(served.spec, proba)
    return _made_events(served, model_name, rows, pids, scores, decisions, actor, now)


def _made_events(
    served: ServedModel,
    model_name: str,
    rows: list[tuple[float, ...]],
    pids: list[UUID],
    scores: np.ndarray,
    decisions: np.ndarray,
    actor: str,
    now: datetime,
) -> tuple[list[Prediction.Made], Predictions]:
    score_list: list[float] = scores.tolist()
    decision_list: list[float] = decisions.tolist()
    spec, model_id, version, digest = served.spec, served.model_id, served.version, served.digest
    if served.candidate is not None:
        return _rollout_events(served, model_name, rows, pids, score_list, decision_list, actor, now)
    events = [
        make_prediction_event(
            pid,
            model_id=model_id,
            model_name=model_name,
            model_version=version,
            spec=spec,
            features=row,
            score=score,
            decision=decision,
            params_digest=digest,
            routing="champion",
            actor=actor,
            timestamp=now,
        )
        for pid, row, score, decision in zip(pids, rows, score_list, decision_list, strict=True)
    ]
    return events, Predictions(list(pids), score_list, decision_list, version, digest)


def _rollout_events(
    served: ServedModel,
    model_name: str,
    rows: list[tuple[float, ...]],
    pids: list[UUID],
    scores: list[float],
    decisions: list[float],
    actor: str,
    now: datetime,
) -> tuple[list[Prediction.Made], Predictions]:
    """During a rollout: rows whose id routes to the candidate are re-scored with its
    state and recorded with its version and digest (routing ``candidate``); the rest are
    the champion's control traffic (routing ``control``)."""
    candidate = served.candidate
    assert candidate is not None
    chosen = [i for i, pid in enumerate(pids) if routes_to_candidate(pid, served.fraction)]
    versions = [served.version] * len(pids)
    digests = [served.digest] * len(pids)
    routing = ["control"] * len(pids)
    if chosen:
        proba = candidate.learner.predict_proba(candidate.state, np.asarray([rows[i] for i in chosen], np.float64))
        c_scores, c_decisions = decide_rows(candidate.spec, proba)
        for j, i in enumerate(chosen):
            scores[i], decisions[i] = float(c_scores[j]), float(c_decisions[j])
            versions[i], digests[i], routing[i] = candidate.version, candidate.digest, "candidate"
    events = [
        make_prediction_event(
            pids[i],
            model_id=served.model_id,
            model_name=model_name,
            model_version=versions[i],
            spec=served.spec,
            features=rows[i],
            score=scores[i],
            decision=decisions[i],
            params_digest=digests[i],
            routing=routing[i],
            actor=actor,
            timestamp=now,
        )
        for i in range(len(pids))
    ]
    return events, Predictions(list(pids), scores, decisions, versions, digests)


def _dedupe_keyed(
    events: list[Prediction.Made], rows: list[tuple[float, ...]], keys: Sequence[str]
) -> list[Prediction.Made]:
    """One event per id: the same key twice with the same features is one prediction."""
    seen: dict[UUID, int] = {}
    out = []
    for i, event in enumerate(events):
        earlier = seen.get(event.originator_id)
        if earlier is not None:
            if rows[earlier] != rows[i]:
                raise ConflictingPredictionError(
                    f"prediction_id {keys[i]!r} appears twice in the request with different features"
                )
            continue
        seen[event.originator_id] = i
        out.append(event)
    return out
