"""The ``Ledger`` application: the use cases that append to, and read from, the log."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, NamedTuple
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import get_topic

from domain.errors import (
    ConcurrencyError,
    ConflictingLabelError,
    InvalidArgumentError,
    ModelExistsError,
    ModelNotFoundError,
    PredictionNotFoundError,
    VersionNotFoundError,
)
from domain.mapping import OrjsonTranscoder, TypedMapper
from domain.model import Model, model_id_for, validate_model_name
from domain.prediction import (
    MADE_TOPIC,
    Prediction,
    make_default_label_event,
    make_label_event,
    validate_label,
    validate_source,
)
from domain.spec import LearnerSpec

MODEL_REGISTERED_TOPIC = get_topic(Model.Registered)


class LabelStatus(enum.Enum):
    """What happened to one piece of feedback."""

    ACCEPTED = "ACCEPTED"
    DUPLICATE = "DUPLICATE"
    LATE = "LATE"


@dataclass(frozen=True)
class LabelRequest:
    """One piece of feedback as a caller sent it."""

    prediction_id: UUID
    label: float
    source: str
    event_time: datetime
    actor: str


@dataclass(frozen=True)
class LabelOutcome:
    """The verdict on one ``LabelRequest``; ``event`` is None for a duplicate."""

    prediction_id: UUID
    status: LabelStatus
    event: Prediction.Labeled | None


def _outcome(prediction_id: UUID, status: LabelStatus, event: Prediction.Labeled | None) -> LabelOutcome:
    # Equal to LabelOutcome(...) field for field, without the frozen dataclass's __init__
    # (one object.__setattr__ per field: ~1 µs, a sixth of prepare_labels per label).
    outcome = object.__new__(LabelOutcome)
    outcome.__dict__.update(prediction_id=prediction_id, status=status, event=event)
    return outcome


class _Facts(NamedTuple):
    """What label validation needs to know about a logged prediction."""

    model_id: UUID
    made_at: datetime
    label: float | None
    defaulted: bool = False
    late_label: float | None = None


class Ledger(Application):
    """Use cases over one ordered log holding every model's and prediction's events.

    Models and predictions share one events table on purpose: a prediction, the label
    that came back for it and the update that learned from it are totally ordered in one
    notification log and can be committed in one transaction (see ARCHITECTURE.md).
    """

    name = "ledger"
    env: ClassVar[dict[str, str]] = {
        "MAPPER_TOPIC": get_topic(TypedMapper),
        "TRANSCODER_TOPIC": get_topic(OrjsonTranscoder),
        "AGGREGATE_CACHE_MAXSIZE": "1000",
    }

    # --- models ------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        spec: LearnerSpec,
        *,
        platform: tuple[tuple[str, str], ...],
        initial_digest: str,
        actor: str,
    ) -> Model:
        """Create a model. Raises ``ModelExistsError`` if the name is taken."""
        validate_model_name(name)
        spec.validate()
        model = Model(name=name, spec=spec, platform=platform, initial_digest=initial_digest, actor=actor)
        try:
            self.save(model)
        except IntegrityError:
            raise ModelExistsError(f"model {name!r} is registered already") from None
        return model

    def get_model(self, name: str) -> Model:
        """The model's current state. Raises ``ModelNotFoundError``."""
        return self.get_model_by_id(model_id_for(name), name)

    def get_model_by_id(self, model_id: UUID, label: str | None = None) -> Model:
        """The model with this aggregate id. Raises ``ModelNotFoundError``."""
        try:
            model: Model = self.repository.get(model_id)
        except AggregateNotFoundError:
            raise ModelNotFoundError(f"no model named {label or str(model_id)!r}") from None
        return model

    def get_model_at(self, name: str, version: int) -> Model:
        """The model's domain state at ``version``. Raises ``VersionNotFoundError``."""
        head = self.get_model(name)
        if not 1 <= version <= head.version:
            raise VersionNotFoundError(f"model {name!r} has versions 1 to {head.version}, not {version}")
        model: Model = self.repository.get(head.id, version=version)
        return model

    def get_model_events(self, model_id: UUID, *, gt: int | None = None, lte: int | None = None) -> list[Any]:
        """The events of one model, oldest first (after version ``gt``, up to ``lte``)."""
        return list(self.events.get(model_id, gt=gt, lte=lte))

    def list_models(self) -> list[Model]:
        """All registered models, in registration order."""
        ids = self._registered_model_ids()
        return [self.get_model_by_id(model_id) for model_id in ids]

    def pause_model(self, name: str, reason: str, actor: str) -> Model:
        """Stop learning for a model (recorded as ``Model.Paused``)."""
        return self._change_model(name, lambda m: m.pause(reason, actor))

    def resume_model(self, name: str, reason: str, actor: str) -> Model:
        """Start learning again (recorded as ``Model.Resumed``)."""
        return self._change_model(name, lambda m: m.resume(reason, actor))

    def roll_back_model(self, name: str, to_version: int, reason: str, actor: str) -> Model:
        """Make version ``to_version``'s state the head state, as a new event.

        The target's digest comes from the log itself (the digest recorded at or before
        that version), so the rollback event certifies what replay must reproduce.
        """

        def roll_back(model: Model) -> None:
            # Out of range: the command's own check raises with the valid range.
            in_range = 1 <= to_version < model.version
            target_digest = self.get_model_at(name, to_version).digest if in_range else ""
            model.roll_back(to_version, target_digest, reason, actor)

        return self._change_model(name, roll_back)

    def rebaseline_model(
        self,
        name: str,
        prediction_ids: tuple[UUID, ...],
        epochs: int,
        window_s: float,
        digest: str,
        reason: str,
        actor: str,
        *,
        at_version: int,
    ) -> Model:
        """Record a re-fit candidate computed from the model at ``at_version``.

        Raises:
            ConcurrencyError: the model changed since (recompute, then try again).
        """

        def rebaseline(model: Model) -> None:
            if model.version != at_version:
                raise ConcurrencyError(f"model {name!r} changed while the rebaseline was computed; try again")
            model.rebaseline(prediction_ids, epochs, window_s, digest, reason, actor)

        return self._change_model(name, rebaseline, attempts=1)

    def abort_rollout_model(self, name: str, reason: str, actor: str) -> Model:
        """Stop a model's rollout by hand; the champion's state is the head again."""

        def abort(model: Model) -> None:
            if not reason.strip():
                raise InvalidArgumentError("aborting a rollout needs a reason")
            rollout = model.rollout
            digest = self.get_model_at(name, rollout.champion_version).digest if rollout is not None else ""
            model.abort_rollout(reason, {}, digest, actor)

        return self._change_model(name, abort)

    def _change_model(self, name: str, command: Callable[[Model], None], attempts: int = 5) -> Model:
        # Operator commands and the learner both append to the model's stream. On a
        # version conflict: reload, re-check (the command re-validates), retry; never
        # overwrite.
        for _ in range(attempts):
            model = self.get_model(name)
            command(model)
            try:
                self.save(model)
            except IntegrityError:
                continue
            return model
        raise ConcurrencyError(f"model {name!r} kept changing under the command; try again")

    def _registered_model_ids(self) -> list[UUID]:
        recorder: Any = self.recorder
        if hasattr(recorder, "select_originator_ids_by_topic"):
            ids: list[UUID] = recorder.select_originator_ids_by_topic(MODEL_REGISTERED_TOPIC)
            return ids
        out: list[UUID] = []
        start = 1
        while True:
            page = self.recorder.select_notifications(start, 1000, topics=[MODEL_REGISTERED_TOPIC])
            out.extend(UUID(str(n.originator_id)) for n in page)
            if len(page) < 1000:
                return out
            start = page[-1].id + 1

    # --- predictions and labels ----------------------------------------------------------

    def get_prediction(self, prediction_id: UUID) -> Prediction:
        """One prediction with its label, if any. Raises ``PredictionNotFoundError``."""
        try:
            prediction: Prediction = self.repository.get(prediction_id)
        except AggregateNotFoundError:
            raise PredictionNotFoundError(f"no prediction with id {prediction_id}") from None
        return prediction

    def get_predictions(self, prediction_ids: Iterable[UUID]) -> dict[UUID, Prediction]:
        """Many predictions in one round trip; missing ids are simply absent."""
        stored = self._select_events_of(prediction_ids)
        by_id: dict[UUID, list[Any]] = {}
        for item in stored:
            by_id.setdefault(UUID(str(item.originator_id)), []).append(self.mapper.to_domain_event(item))
        out: dict[UUID, Prediction] = {}
        for pid, events in by_id.items():
            aggregate: Prediction | None = None
            for domain_event in sorted(events, key=lambda e: e.originator_version):
                aggregate = domain_event.mutate(aggregate)
            if isinstance(aggregate, Prediction):
                out[pid] = aggregate
        return out

    def prepare_labels(
        self,
        requests: Sequence[LabelRequest],
        *,
        received_at: datetime,
        pending: dict[UUID, Prediction.Made] | None = None,
    ) -> list[LabelOutcome]:
        """Validate feedback against the logged predictions and build the label events.

        Nothing is written here; the caller commits the events with ``record`` (the group
        commit writer batches many callers into one transaction).

        Args:
            requests: feedback in arrival order.
            received_at: the time stamped on the label events.
            pending: predictions made but not yet committed, by id (simulation drivers).

        Returns:
            One outcome per request, in order. A repeat of an identical label (in the log
            or earlier in ``requests``) is ``DUPLICATE`` with no event; a label outside the
            model's feedback window is stored but ``LATE``.

        Raises:
            PredictionNotFoundError: a request names no logged prediction.
            ConflictingLabelError: a different label was recorded for it already.
            InvalidArgumentError: a label the model's head cannot take.
        """
        pending = pending or {}
        facts = self._prediction_facts(r.prediction_id for r in requests if r.prediction_id not in pending)
        for pid, made in pending.items():
            facts.setdefault(pid, _Facts(made.model_id, made.timestamp, None))
        seen: dict[UUID, float] = {}
        outcomes: list[LabelOutcome] = []
        for request in requests:
            pid = request.prediction_id
            fact = facts.get(pid)
            if fact is None:
                raise PredictionNotFoundError(f"no prediction with id {pid}")
            spec, window = self._spec_of(fact.model_id)
            label = validate_label(spec, request.label)
            source = validate_source(request.source)
            # After a default label, the real one is still recorded (nothing lost), as
            # version 3 and late: the default was what the learner could use in time.
            earlier = seen.get(pid, fact.late_label if fact.defaulted else fact.label)
            if earlier is not None:
                if earlier != label:
                    raise ConflictingLabelError(f"prediction {pid} was labeled {earlier:g} already; refusing {label:g}")
                outcomes.append(_outcome(pid, LabelStatus.DUPLICATE, None))
                continue
            seen[pid] = label
            in_window = not fact.defaulted and request.event_time - fact.made_at <= window
            event = make_label_event(
                pid,
                model_id=fact.model_id,
                label=label,
                source=source,
                event_time=request.event_time,
                in_window=in_window,
                actor=request.actor,
                timestamp=received_at,
                version=3 if fact.defaulted else 2,
            )
            outcomes.append(_outcome(pid, LabelStatus.ACCEPTED if in_window else LabelStatus.LATE, event))
        return outcomes

    def _prediction_facts(self, prediction_ids: Iterable[UUID]) -> dict[UUID, _Facts]:
        # Label validation needs three facts per prediction, not the aggregate: decoding
        # the events without replaying them through the aggregate is ~3x cheaper.
        stored = self._select_events_of(prediction_ids)
        facts: dict[UUID, _Facts] = {}
        for item in sorted(stored, key=lambda s: s.originator_version):
            event: Any = self.mapper.to_domain_event(item)
            pid = event.originator_id
            if isinstance(event, Prediction.Made):
                facts[pid] = _Facts(event.model_id, event.timestamp, None)
            elif pid not in facts:
                continue
            elif isinstance(event, Prediction.DefaultLabeled):
                facts[pid] = facts[pid]._replace(label=event.label, defaulted=True)
            elif facts[pid].defaulted:
                facts[pid] = facts[pid]._replace(late_label=event.label)
            else:
                facts[pid] = facts[pid]._replace(label=event.label)
        return facts

    def record(self, events: Sequence[DomainEventProtocol[Any]]) -> list[int]:
        """Commit events, in order, in one transaction; return their notification ids.

        Raises:
            ConcurrencyError: an event's stream position was taken (a duplicate
                prediction id or label, or a concurrent model change); nothing was written.
        """
        if not events:
            return []
        rows = self.encode_rows(events)
        if rows is not None:
            return self.record_rows(rows)
        try:
            ids = self.recorder.insert_events([self.mapper.to_stored_event(e) for e in events])
        except IntegrityError as exc:
            raise ConcurrencyError(f"a stream position was taken by another writer: {exc}") from None
        return list(ids or [])

    def encode_rows(self, events: Sequence[DomainEventProtocol[Any]]) -> list[tuple[Any, int, str, bytes]] | None:
        """The rows ``events`` are stored as, or None when the recorder takes no rows.

        Encoding is the Python-heavy half of a commit: callers that commit on another
        thread encode first, on their own thread, and hand ``record_rows`` only I/O.
        (EventStore.put would also build a Recording object per event, which the hot path
        never reads.)

        Raises:
            NonFiniteValueError: an event holds a NaN or infinity.
        """
        mapper: Any = self.mapper
        if not (hasattr(self.recorder, "insert_rows") and hasattr(mapper, "to_row")):
            return None
        to_row = mapper.to_row
        return [to_row(e) for e in events]

    def record_rows(self, rows: Sequence[tuple[Any, int, str, bytes]]) -> list[int]:
        """Commit rows from ``encode_rows``, in order, in one transaction.

        Raises:
            ConcurrencyError: a row's stream position was taken; nothing was written.
        """
        recorder: Any = self.recorder
        try:
            return list(recorder.insert_rows(rows))
        except IntegrityError as exc:
            raise ConcurrencyError(f"a stream position was taken by another writer: {exc}") from None

    def prepare_default_labels(
        self, *, now: datetime, after: int = 0, limit: int = 1000, actor: str = "default-labeler"
    ) -> tuple[list[Prediction.DefaultLabeled], int]:
        """Default labels for predictions whose feedback window closed without a label.

        Only models whose spec declares ``default_label`` get them. Nothing is written;
        commit the events with ``record`` (a real label racing in first makes that a
        ``ConcurrencyError``: prepare again).

        Args:
            now: the closing time to compare windows against.
            after: log position to scan from (the cursor a previous call returned).
            limit: most unlabeled predictions to look at.

        Returns:
            The events, and the cursor for the next call: the position before the first
            prediction whose window is still open.
        """
        recorder: Any = self.recorder
        if not hasattr(recorder, "select_unanswered"):
            return [], after
        rows = recorder.select_unanswered(MADE_TOPIC, after, limit)
        events: list[Prediction.DefaultLabeled] = []
        cursor: int | None = None
        for position, stored in rows:
            made: Any = self.mapper.to_domain_event(stored)
            spec, window = self._spec_of(made.model_id)
            if spec.default_label is None:
                continue
            if made.timestamp + window > now:
                cursor = position - 1 if cursor is None else cursor
                continue
            events.append(
                make_default_label_event(
                    made.originator_id, model_id=made.model_id, spec=spec, actor=actor, timestamp=now
                )
            )
        if cursor is None:
            cursor = rows[-1][0] if rows else after
        return events, cursor

    def _select_events_of(self, originator_ids: Iterable[UUID]) -> list[Any]:
        # One round trip on the ledger's recorder; one query per id on any other.
        ids = list(dict.fromkeys(originator_ids))
        if not ids:
            return []
        recorder: Any = self.recorder
        if hasattr(recorder, "select_events_for_originators"):
            return list(recorder.select_events_for_originators(ids))
        return [s for pid in ids for s in self.recorder.select_events(pid)]

    def _spec_of(self, model_id: UUID) -> tuple[LearnerSpec, timedelta]:
        # Specs never change after registration, so caching them is always safe.
        cache: dict[UUID, tuple[LearnerSpec, timedelta]] = self.__dict__.setdefault("_spec_cache", {})
        found = cache.get(model_id)
        if found is None:
            spec = self.get_model_by_id(model_id).spec
            found = cache[model_id] = (spec, timedelta(seconds=spec.feedback_window_s))
        return found
