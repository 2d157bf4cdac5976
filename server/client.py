"""A typed Python client for ``learnledger.v1.Ledger``: retries only what is safe to retry.

Retries happen on UNAVAILABLE and ABORTED only. Predict is made retry-safe by always
sending an idempotency key (generated here when the caller gives none), so a retry
after a lost reply returns the original prediction instead of making a second one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from domain.ids import new_prediction_id
from learnledger.v1 import ledger_pb2 as pb
from learnledger.v1 import ledger_pb2_grpc as pb_grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_T = TypeVar("_T")


@dataclass(frozen=True)
class Prediction:
    """A committed prediction."""

    prediction_id: str
    score: float
    decision: float
    model_version: int
    params_digest: str


@dataclass(frozen=True)
class Label:
    """One piece of feedback to send."""

    prediction_id: str
    label: float
    event_time: datetime | None = None
    source: str = ""


@dataclass(frozen=True)
class FeedbackSummary:
    """What a feedback stream reports once every accepted label is committed."""

    accepted: int
    duplicate: int
    late: int
    rejected: int
    errors: tuple[tuple[int, str, str, str], ...]


@dataclass(frozen=True)
class State:
    """A model's state at a version: its digest, and an optional score from it."""

    model: str
    version: int
    params_digest: str
    steps: int
    score: float | None = None
    decision: float | None = None


class LedgerClient:
    """Typed calls over one channel; use as a context manager or call ``close``.

    Args:
        target: ``host:port``.
        token: bearer token sent with every call (None: no authorization header).
        root_certificates: PEM bytes to trust for TLS (None: plaintext).
        retries: attempts after the first on UNAVAILABLE/ABORTED.
        backoff_s: first retry delay; doubles each attempt.
        timeout_s: per-call deadline.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        retries: int = 5,
        backoff_s: float = 0.05,
        timeout_s: float = 30.0,
    ):
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if root_certificates is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.LedgerStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def _call(self, method: Callable[..., _T], request: Any) -> _T:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s, metadata=self.metadata)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retries:  # type: ignore[attr-defined]
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    # --- models -------------------------------------------------------------------------

    def register_model(self, name: str, spec: dict[str, Any]) -> pb.ModelInfo:
        """Register a model; ``spec`` holds LearnerSpec fields (kind and n_features at least),
        and optionally ``policy``: a mapping of SafetyPolicy fields."""
        fields = dict(spec)
        policy = fields.pop("policy", None)
        if policy is not None:
            fields["policy_json"] = orjson.dumps(policy).decode()
        return self._call(self.stub.RegisterModel, pb.RegisterModelRequest(name=name, spec=pb.LearnerSpec(**fields)))

    def get_model(self, name: str) -> pb.ModelInfo:
        """A model's head: version, digest, paused, counts."""
        return self._call(self.stub.GetModel, pb.GetModelRequest(name=name))

    def list_models(self) -> list[pb.ModelInfo]:
        """Every model."""
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest()).models)

    # --- predictions --------------------------------------------------------------------------

    def predict(self, model: str, features: Sequence[float], *, prediction_id: str | None = None) -> Prediction:
        """Score one row; returns once the prediction is committed."""
        key = prediction_id or str(new_prediction_id())
        reply = self._call(self.stub.Predict, pb.PredictRequest(model=model, features=features, prediction_id=key))
        return _prediction(reply)

    def predict_batch(
        self, model: str, rows: Sequence[Sequence[float]], *, prediction_ids: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Score many rows in one call and one commit."""
        keys = list(prediction_ids) if prediction_ids is not None else [str(new_prediction_id()) for _ in rows]
        request = pb.PredictBatchRequest(
            model=model, rows=[pb.PredictRow(features=r, prediction_id=k) for r, k in zip(rows, keys, strict=True)]
        )
        return [_prediction(r) for r in self._call(self.stub.PredictBatch, request).results]

    # --- feedback -------------------------------------------------------------------------------

    def feedback(
        self, prediction_id: str, label: float, *, event_time: datetime | None = None, source: str = ""
    ) -> str:
        """Send one label; returns ``ACCEPTED``, ``DUPLICATE`` or ``LATE`` once committed."""
        reply = self._call(self.stub.Feedback, _feedback_request(Label(prediction_id, label, event_time, source)))
        return pb.FeedbackResponse.Status.Name(reply.status)

    def feedback_stream(self, labels: Iterable[Label], *, per_message: int = 256) -> FeedbackSummary:
        """Stream labels, ``per_message`` to a message (1 uses ``FeedbackStream``); not retried.

        A stream is not retried as a whole: its labels are idempotent, so a caller that
        sees UNAVAILABLE may simply send the same labels again.
        """
        if per_message <= 1:
            reply = self.stub.FeedbackStream(
                (_feedback_request(x) for x in labels), timeout=self.timeout_s * 10, metadata=self.metadata
            )
        else:
            reply = self.stub.FeedbackBatchStream(
                _batches(labels, per_message), timeout=self.timeout_s * 10, metadata=self.metadata
            )
        return FeedbackSummary(
            reply.accepted,
            reply.duplicate,
            reply.late,
            reply.rejected,
            tuple((e.index, e.prediction_id, e.code, e.message) for e in reply.errors),
        )

    # --- history, time travel, operations -----------------------------------------------------------

    def list_versions(self, model: str) -> list[pb.VersionInfo]:
        """One row per version, oldest first."""
        return list(self._call(self.stub.ListVersions, pb.ListVersionsRequest(model=model)).versions)

    def get_state(
        self,
        model: str,
        *,
        version: int | None = None,
        as_of: datetime | None = None,
        features: Sequence[float] | None = None,
    ) -> State:
        """The state at a version or time (head when neither); optionally score ``features``."""
        request = pb.GetStateRequest(model=model, features=features or ())
        if version is not None:
            request.version = version
        elif as_of is not None:
            request.as_of.CopyFrom(_timestamp(as_of))
        reply = self._call(self.stub.GetState, request)
        return State(
            reply.model,
            reply.version,
            reply.params_digest,
            reply.steps,
            reply.score if reply.HasField("score") else None,
            reply.decision if reply.HasField("decision") else None,
        )

    def rollback(self, model: str, to_version: int, reason: str) -> pb.ModelInfo:
        """Make an earlier version's state the head."""
        return self._call(self.stub.Rollback, pb.RollbackRequest(model=model, to_version=to_version, reason=reason))

    def pause(self, model: str, reason: str) -> pb.ModelInfo:
        """Stop learning."""
        return self._call(self.stub.Pause, pb.PauseRequest(model=model, reason=reason))

    def resume(self, model: str, reason: str) -> pb.ModelInfo:
        """Start learning again."""
        return self._call(self.stub.Resume, pb.ResumeRequest(model=model, reason=reason))

    def rebaseline(self, model: str, window_s: float, reason: str = "", epochs: int = 0) -> pb.ModelInfo:
        """Re-fit on the last ``window_s`` seconds' examples; the result starts a canary rollout."""
        request = pb.RebaselineRequest(model=model, window_s=window_s, epochs=epochs, reason=reason)
        return self._call(self.stub.Rebaseline, request)

    def abort_rollout(self, model: str, reason: str) -> pb.ModelInfo:
        """Stop a rollout; the champion serves all traffic again."""
        return self._call(self.stub.AbortRollout, pb.AbortRolloutRequest(model=model, reason=reason))

    def explain(self, prediction_id: str) -> pb.ExplainResponse:
        """Why a past decision was made (the server replays the serving version)."""
        return self._call(self.stub.Explain, pb.ExplainRequest(prediction_id=prediction_id))

    def verify_audit(self, model: str = "") -> pb.VerifyAuditResponse:
        """Replay from genesis and compare every digest (slow on long histories)."""
        request = pb.VerifyAuditRequest(model=model)
        return self.stub.VerifyAudit(request, timeout=self.timeout_s * 20, metadata=self.metadata)

    def watch_model(
        self, model: str, *, from_version: int = 0, timeout_s: float | None = None
    ) -> Iterator[pb.ModelVersionChanged]:
        """Stream version changes (not retried: resume with ``from_version``)."""
        request = pb.WatchModelRequest(model=model, from_version=from_version)
        return iter(self.stub.WatchModel(request, timeout=timeout_s, metadata=self.metadata))


def _prediction(reply: pb.PredictResponse) -> Prediction:
    return Prediction(reply.prediction_id, reply.score, reply.decision, reply.model_version, reply.params_digest)


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return stamp


def _feedback_request(label: Label) -> pb.FeedbackRequest:
    request = pb.FeedbackRequest(prediction_id=label.prediction_id, label=label.label, source=label.source)
    if label.event_time is not None:
        request.event_time.CopyFrom(_timestamp(label.event_time))
    return request


def _batches(labels: Iterable[Label], size: int) -> Iterator[pb.FeedbackBatch]:
    batch: list[pb.FeedbackRequest] = []
    for label in labels:
        batch.append(_feedback_request(label))
        if len(batch) >= size:
            yield pb.FeedbackBatch(items=batch)
            batch = []
    if batch:
        yield pb.FeedbackBatch(items=batch)
