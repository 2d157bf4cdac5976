"""The gRPC servicer: convert the request, call a use case, convert the answer (nothing else)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import grpc
import numpy as np
import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from domain.errors import InvalidArgumentError, InvalidSpecError, LedgerError
from domain.ids import prediction_id_for
from domain.ledger import LabelRequest, LabelStatus
from domain.model import Model
from domain.spec import LearnerSpec
from learnledger.v1 import ledger_pb2 as pb
from learnledger.v1 import ledger_pb2_grpc as pb_grpc
from server.auth import current_caller
from server.catalog import ModelCatalog
from server.errors import map_errors
from server.learner_loop import LearnerLoop
from server.services import LedgerService, VersionRow
from server.serving import FeedbackTally, Predictions, PredictResult, ServingService
from server.stream_inbox import StreamInbox

_STATUS = {
    LabelStatus.ACCEPTED: pb.FeedbackResponse.ACCEPTED,
    LabelStatus.DUPLICATE: pb.FeedbackResponse.DUPLICATE,
    LabelStatus.LATE: pb.FeedbackResponse.LATE,
}
_OPTIONAL_SPEC_FIELDS = (
    "head",
    "n_classes",
    "optimizer",
    "learning_rate",
    "l2",
    "batch_size",
    "seed",
    "standardize",
    "threshold",
    "feedback_window_s",
)
log = logging.getLogger(__name__)
STREAM_CHUNK = 1024
# Labels a feedback stream's reader holds before it stops receiving, and how long a
# partial chunk may gather once labels arrive (they are acknowledged only in the
# stream's summary, after their commit, so a few ms here delay nothing a client sees).
STREAM_INBOX = 16 * STREAM_CHUNK
STREAM_GATHER_S = 0.002
WATCH_POLL_S = 1.0


class LedgerServicer(pb_grpc.LedgerServicer):
    """``learnledger.v1.Ledger`` over the serving and ledger services."""

    def __init__(
        self,
        service: LedgerService,
        serving: ServingService,
        catalog: ModelCatalog,
        learner: LearnerLoop | None,
        stopping: threading.Event,
    ):
        self.service = service
        self.ledger = service.ledger
        self.serving = serving
        self.catalog = catalog
        self.learner = learner
        self.stopping = stopping

    # --- models --------------------------------------------------------------------------

    @map_errors
    def RegisterModel(self, request: pb.RegisterModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        """Register a model (role: operate)."""
        model = self.service.register_model(request.name, spec_from_proto(request.spec), current_caller().name)
        # Load (and compile) the learner before replying: the first labels then find a
        # learner ready, instead of waiting for XLA while predictions pile up on version 1.
        self._refresh(model)
        return model_info(model)

    @map_errors
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        """A model's head: version, digest, paused, counts."""
        return model_info(self.ledger.get_model(request.name))

    @map_errors
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        """Every model, in registration order."""
        return pb.ListModelsResponse(models=[model_info(m) for m in self.ledger.list_models()])

    # --- predictions -------------------------------------------------------------------------

    @map_errors
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        """Score one row; replies after the prediction is committed."""
        out = self.serving.predict_one(request.model, request.features, request.prediction_id, current_caller().name)
        # One row: the version and digest are scalars unless a retry returned an older one.
        version, digest = out.model_version, out.params_digest
        reply = pb.PredictResponse(
            prediction_id=str(out.ids[0]),
            score=out.scores[0],
            decision=out.decisions[0],
            model_version=version[0] if isinstance(version, list) else version,
            params_digest=digest[0] if isinstance(digest, list) else digest,
        )
        if log.isEnabledFor(logging.DEBUG):  # the hot path builds no log record otherwise
            log.debug(
                "predicted", extra={"rpc": "Predict", "model": request.model, "prediction_id": reply.prediction_id}
            )
        return reply

    @map_errors
    def PredictBatch(self, request: pb.PredictBatchRequest, context: grpc.ServicerContext) -> bytes:
        """Score many rows in one commit; one result per row, in order."""
        rows = request.rows
        out = self.serving.predict_rows(
            request.model, [r.features for r in rows], [r.prediction_id for r in rows], current_caller().name
        )
        if log.isEnabledFor(logging.DEBUG):
            ids = [str(i) for i in out.ids]
            log.debug(
                "predicted %d rows",
                len(ids),
                extra={"rpc": "PredictBatch", "model": request.model, "prediction_ids": ids},
            )
        # Bytes: the server registers PredictBatch with a pass-through serializer.
        return predict_batch_bytes(out)

    # --- feedback ------------------------------------------------------------------------------

    @map_errors
    def Feedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext) -> pb.FeedbackResponse:
        """Record one label; replies ACCEPTED, DUPLICATE or LATE after commit."""
        label = label_request(request, current_caller().name, datetime.now(UTC))
        outcome = self.serving.feedback([label])[0]
        return pb.FeedbackResponse(status=_STATUS[outcome.status], prediction_id=str(outcome.prediction_id))

    @map_errors
    def FeedbackStream(
        self, request_iterator: Iterator[pb.FeedbackRequest], context: grpc.ServicerContext
    ) -> pb.FeedbackSummary:
        """Labels one per message; returns the summary once every accepted one is committed."""
        return self._ingest(([r] for r in request_iterator), context)

    @map_errors
    def FeedbackBatchStream(
        self, request_iterator: Iterator[pb.FeedbackBatch], context: grpc.ServicerContext
    ) -> pb.FeedbackSummary:
        """Labels many per message: the high-rate form of ``FeedbackStream``."""
        return self._ingest((list(b.items) for b in request_iterator), context)

    def _ingest(
        self, messages: Iterator[list[pb.FeedbackRequest]], context: grpc.ServicerContext
    ) -> pb.FeedbackSummary:
        actor = current_caller().name
        tally = self.serving.feedback_stream(_chunks(messages, actor))
        return feedback_summary(tally)

    # --- history and time travel --------------------------------------------------------------------

    @map_errors
    def ListVersions(self, request: pb.ListVersionsRequest, context: grpc.ServicerContext) -> pb.ListVersionsResponse:
        """One row per model version, oldest first."""
        rows = self.service.history(request.model)
        return pb.ListVersionsResponse(model=request.model, versions=[version_info(r) for r in rows])

    @map_errors
    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext) -> pb.GetStateResponse:
        """The state at a version (or in force at a time): version, digest, optional score."""
        which = request.WhichOneof("at")
        version = request.version if which == "version" else None
        as_of = request.as_of.ToDatetime(tzinfo=UTC) if which == "as_of" else None
        folded = self.service.state_at(request.model, version=version, at_time=as_of)
        reply = pb.GetStateResponse(
            model=request.model, version=folded.version, params_digest=folded.digest, steps=int(folded.state.step)
        )
        if request.features:
            scored = self.service.score(folded, self.ledger.get_model(request.model).spec, list(request.features))
            reply.score, reply.decision = scored.score, scored.decision
        return reply

    @map_errors
    def VerifyAudit(self, request: pb.VerifyAuditRequest, context: grpc.ServicerContext) -> pb.VerifyAuditResponse:
        """Replay from genesis and compare every recorded digest."""
        reports = self.service.verify(request.model or None)
        models = []
        for r in reports:
            d = r.divergence
            models.append(
                pb.ModelVerification(
                    model=r.model,
                    verified=r.verified,
                    versions_checked=r.versions_checked,
                    updates_replayed=r.updates_replayed,
                    divergence_version=d.version if d else 0,
                    divergence_event=d.event if d else "",
                    recorded_digest=d.recorded if d else "",
                    replayed_digest=d.replayed if d else "",
                    platform_differs=bool(r.platform_differences),
                )
            )
        return pb.VerifyAuditResponse(
            verified=all(r.verified for r in reports),
            versions_checked=sum(r.versions_checked for r in reports),
            updates_replayed=sum(r.updates_replayed for r in reports),
            models=models,
        )

    @map_errors
    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.ExplainResponse:
        """Why a past decision was made, re-derived from the log (role: audit)."""
        from projections.explain import explain_prediction

        try:
            prediction_id = UUID(request.prediction_id.strip())
        except ValueError:
            raise InvalidArgumentError(f"not a prediction id (a UUID): {request.prediction_id!r}") from None
        explanation = explain_prediction(self.ledger, self.service.replayer, prediction_id)
        report = explanation.to_json()
        decided = report["decision"]
        return pb.ExplainResponse(
            prediction_id=str(decided["prediction_id"]),
            model=decided["model"],
            model_version=int(decided["model_version"]),
            params_digest=decided["params_digest"],
            score=float(decided["score"]),
            recomputed_score=float(decided["recomputed_score"]),
            decision=float(decided["decision"]),
            top_reasons=list(report["reasons"]["top_reasons"]),
            report_json=orjson.dumps(report).decode(),
        )

    @map_errors
    def WatchModel(
        self, request: pb.WatchModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelVersionChanged]:
        """Stream every committed model version after ``from_version`` (0: from the head)."""
        model = self.ledger.get_model(request.model)
        sent = request.from_version if request.from_version > 0 else model.version - 1
        digest = ""
        if sent > 0:
            digest = _digest_at(self.ledger.get_model_events(model.id, lte=sent))
        while context.is_active() and not self.stopping.is_set():
            for event in self.ledger.events.get(model.id, gt=sent):
                digest = getattr(event, "digest", None) or getattr(event, "initial_digest", None) or digest
                yield version_changed(request.model, event, digest)
                sent = event.originator_version
            # Woken by this process's commits; the timeout also follows other writers.
            with self.catalog.changed:
                self.catalog.changed.wait(WATCH_POLL_S)

    # --- operations -----------------------------------------------------------------------------------

    @map_errors
    def Rollback(self, request: pb.RollbackRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        """Make an earlier version's state the head (a new event)."""
        model = self.service.roll_back(request.model, request.to_version, request.reason, current_caller().name)
        self._refresh(model)
        return model_info(model)

    @map_errors
    def Pause(self, request: pb.PauseRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        """Stop learning (predictions keep being served)."""
        model = self.service.pause(request.model, request.reason, current_caller().name)
        self._refresh(model)
        return model_info(model)

    @map_errors
    def Resume(self, request: pb.ResumeRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        """Start learning again."""
        model = self.service.resume(request.model, request.reason, current_caller().name)
        self._refresh(model)
        return model_info(model)

    @map_errors
    def Rebaseline(self, request: pb.RebaselineRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        """Re-fit on a recent window; the result serves as a canary candidate."""
        model = self.service.rebaseline(
            request.model, request.window_s, request.reason, current_caller().name, epochs=request.epochs or None
        )
        self._refresh(model)
        return model_info(model)

    @map_errors
    def AbortRollout(self, request: pb.AbortRolloutRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        """Stop a rollout; the champion serves all traffic again."""
        model = self.service.abort_rollout(request.model, request.reason, current_caller().name)
        self._refresh(model)
        return model_info(model)

    def _refresh(self, model: Model) -> None:
        # The reply waits until the new head serves, so a caller's next Predict sees it.
        if self.learner is not None:
            self.learner.refresh(model.name).result(timeout=60)
        else:
            self.catalog.load(model)


# --- conversions --------------------------------------------------------------------------------------


def spec_from_proto(spec: pb.LearnerSpec) -> LearnerSpec:
    """A domain spec from the message; unset optional fields take the core's defaults."""
    values: dict[str, Any] = {"kind": spec.kind, "n_features": spec.n_features}
    if spec.feature_names:
        values["feature_names"] = list(spec.feature_names)
    if spec.hidden:
        values["hidden"] = list(spec.hidden)
    for name in _OPTIONAL_SPEC_FIELDS:
        if spec.HasField(name):
            values[name] = getattr(spec, name)
    if spec.HasField("policy_json"):
        try:
            policy = orjson.loads(spec.policy_json)
        except orjson.JSONDecodeError as exc:
            raise InvalidSpecError(f"policy_json is not valid JSON: {exc}") from None
        if not isinstance(policy, dict):
            raise InvalidSpecError("policy_json must be a JSON object")
        values["policy"] = policy
    return LearnerSpec.from_dict(values)


def spec_to_proto(spec: LearnerSpec) -> pb.LearnerSpec:
    """The message form of a domain spec (every field set)."""
    message = pb.LearnerSpec(
        kind=spec.kind, n_features=spec.n_features, feature_names=list(spec.feature_names), hidden=list(spec.hidden)
    )
    for name in _OPTIONAL_SPEC_FIELDS:
        setattr(message, name, getattr(spec, name))
    message.policy_json = orjson.dumps(spec.policy.to_dict()).decode()
    return message


def model_info(model: Model) -> pb.ModelInfo:
    """The message form of a model's head."""
    return pb.ModelInfo(
        name=model.name,
        id=str(model.id),
        version=model.version,
        params_digest=model.digest,
        paused=model.paused,
        spec=spec_to_proto(model.spec),
        updates_applied=model.updates_applied,
        updates_rejected=model.updates_rejected,
        rollbacks=model.rollbacks,
        steps=model.steps,
        serving_version=model.serving_version,
        drift_detections=model.drift_detections,
        pause_reason=model.pause_reason,
        labels_consumed=model.labels_consumed,
        rollout=None
        if model.rollout is None
        else pb.Rollout(
            candidate_version=model.rollout.candidate_version,
            champion_version=model.rollout.champion_version,
            stage=model.rollout.stage,
            fraction=model.rollout.fraction,
        ),
    )


def predict_batch_bytes(out: Predictions) -> bytes:
    """``predict_batch_response(out).SerializeToString()``, encoded with numpy (~10x faster).

    Every row has the same layout when the rows share one model version and digest
    (always, unless an idempotent retry returned older predictions: then the message
    path is used). Fields are written even when zero, which every protobuf parser
    accepts; the parsed message equals ``predict_batch_response(out)`` (tested).
    """
    version, digest = out.model_version, out.params_digest
    if isinstance(version, list) or isinstance(digest, list):
        return predict_batch_response(out).SerializeToString()
    n = len(out.ids)
    digest_bytes = digest.encode()
    tail = b"\x18" + _varint(version) + b"\x22" + _varint(len(digest_bytes)) + digest_bytes + b"\x29"
    head = b"\x0a" + _varint(2 + 36 + 9 + len(tail) + 8) + b"\x0a\x24"  # results[i] { prediction_id (36)
    rows = np.empty(
        n,
        np.dtype(
            [
                ("head", f"S{len(head)}"),
                ("pid", "u1", (36,)),
                ("score_tag", "S1"),
                ("score", "<f8"),
                ("tail", f"S{len(tail)}"),
                ("decision", "<f8"),
            ]
        ),
    )
    rows["head"], rows["score_tag"], rows["tail"] = head, b"\x11", tail
    rows["score"], rows["decision"] = out.scores, out.decisions
    hexes = np.frombuffer("".join([f"{pid.int:032x}" for pid in out.ids]).encode(), np.uint8).reshape(n, 32)
    pid = rows["pid"]
    start = 0
    for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)):  # 8-4-4-4-12 with dashes between
        pid[:, start : start + b - a] = hexes[:, a:b]
        if b < 32:
            pid[:, start + b - a] = ord("-")
        start += b - a + 1
    rows["pid"] = pid
    return rows.tobytes()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def predict_batch_response(out: Predictions) -> pb.PredictBatchResponse:
    """The message form of committed predictions (one result per row, in order)."""
    reply = pb.PredictBatchResponse()
    add = reply.results.add
    for pid, score, decision, version, digest in zip(
        out.ids, out.scores, out.decisions, out.versions(), out.digests(), strict=True
    ):
        add(prediction_id=str(pid), score=score, model_version=version, params_digest=digest, decision=decision)
    return reply


def predict_response(result: PredictResult) -> pb.PredictResponse:
    """The message form of a committed prediction."""
    return pb.PredictResponse(
        prediction_id=str(result.prediction_id),
        score=result.score,
        model_version=result.model_version,
        params_digest=result.params_digest,
        decision=result.decision,
    )


def label_request(message: pb.FeedbackRequest, actor: str, now: datetime) -> LabelRequest:
    """A domain label request; an unset event time means "when it was received".

    Raises:
        InvalidArgumentError: no prediction id.
    """
    if not message.prediction_id:
        raise InvalidArgumentError("feedback needs the prediction_id the prediction replied with")
    key = message.prediction_id
    event_time = message.event_time.ToDatetime(tzinfo=UTC) if message.HasField("event_time") else now
    # Built like the domain builds its events (no frozen-dataclass __init__: ~1 µs a
    # label on the FeedbackStream path); equal to LabelRequest(...) field for field.
    request = object.__new__(LabelRequest)
    request.__dict__.update(
        prediction_id=prediction_id_for(key),
        label=message.label,
        source=message.source,
        event_time=event_time,
        actor=actor,
    )
    return request


def feedback_summary(tally: FeedbackTally) -> pb.FeedbackSummary:
    """The message form of a stream's tally."""
    return pb.FeedbackSummary(
        accepted=tally.accepted,
        duplicate=tally.duplicate,
        late=tally.late,
        rejected=tally.rejected,
        errors=[pb.FeedbackError(index=i, prediction_id=p, code=c, message=m) for i, p, c, m in tally.errors],
    )


def version_info(row: VersionRow) -> pb.VersionInfo:
    """The message form of one history row."""
    message = pb.VersionInfo(
        version=row.version,
        event=row.event,
        time=_timestamp(row.time),
        batch_size=row.batch_size,
        params_digest=row.params_digest,
        actor=row.actor,
        detail=row.detail,
    )
    if row.loss_before is not None:
        message.loss_before = row.loss_before
    if row.loss_after is not None:
        message.loss_after = row.loss_after
    return message


def version_changed(name: str, event: Any, digest: str) -> pb.ModelVersionChanged:
    """The message form of one committed model event."""
    return pb.ModelVersionChanged(
        model=name,
        version=event.originator_version,
        event=type(event).__name__,
        params_digest=digest,
        time=_timestamp(event.timestamp),
        actor=getattr(event, "actor", ""),
    )


def _digest_at(events: list[Any]) -> str:
    digest = ""
    for event in events:
        digest = getattr(event, "digest", None) or getattr(event, "initial_digest", None) or digest
    return digest


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _chunks(
    messages: Iterator[list[pb.FeedbackRequest]],
    actor: str,
) -> Iterator[list[tuple[int, LabelRequest | None, str, BaseException | None]]]:
    """Group incoming labels into chunks of what has arrived, received on a helper thread.

    The bounded inbox is the flow control: when the writer falls behind, the reader
    stops, gRPC's window fills, and the client's sends block.
    """
    inbox: StreamInbox[pb.FeedbackRequest] = StreamInbox(
        batch=STREAM_CHUNK, limit=STREAM_INBOX, gather_s=STREAM_GATHER_S
    )
    inbox.start(messages, "feedback-stream-reader")
    index = 0
    for batch in inbox.batches():
        chunk: list[tuple[int, LabelRequest | None, str, BaseException | None]] = []
        now = datetime.now(UTC)
        for message in batch:
            try:
                chunk.append((index, label_request(message, actor, now), message.prediction_id, None))
            except (LedgerError, ValueError) as exc:
                chunk.append((index, None, message.prediction_id, exc))
            index += 1
        yield chunk
