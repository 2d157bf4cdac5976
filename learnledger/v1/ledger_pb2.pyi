import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LearnerSpec(_message.Message):
    __slots__ = ("kind", "n_features", "feature_names", "head", "n_classes", "hidden", "optimizer", "learning_rate", "l2", "batch_size", "seed", "standardize", "threshold", "feedback_window_s", "policy_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    N_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    N_CLASSES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STANDARDIZE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    n_features: int
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    head: str
    n_classes: int
    hidden: _containers.RepeatedScalarFieldContainer[int]
    optimizer: str
    learning_rate: float
    l2: float
    batch_size: int
    seed: int
    standardize: bool
    threshold: float
    feedback_window_s: float
    policy_json: str
    def __init__(self, kind: _Optional[str] = ..., n_features: _Optional[int] = ..., feature_names: _Optional[_Iterable[str]] = ..., head: _Optional[str] = ..., n_classes: _Optional[int] = ..., hidden: _Optional[_Iterable[int]] = ..., optimizer: _Optional[str] = ..., learning_rate: _Optional[float] = ..., l2: _Optional[float] = ..., batch_size: _Optional[int] = ..., seed: _Optional[int] = ..., standardize: _Optional[bool] = ..., threshold: _Optional[float] = ..., feedback_window_s: _Optional[float] = ..., policy_json: _Optional[str] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("name", "spec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: LearnerSpec
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[LearnerSpec, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "id", "version", "params_digest", "paused", "spec", "updates_applied", "updates_rejected", "rollbacks", "steps", "serving_version", "drift_detections", "pause_reason", "rollout", "labels_consumed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    DRIFT_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_REASON_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    LABELS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: str
    version: int
    params_digest: str
    paused: bool
    spec: LearnerSpec
    updates_applied: int
    updates_rejected: int
    rollbacks: int
    steps: int
    serving_version: int
    drift_detections: int
    pause_reason: str
    rollout: Rollout
    labels_consumed: int
    def __init__(self, name: _Optional[str] = ..., id: _Optional[str] = ..., version: _Optional[int] = ..., params_digest: _Optional[str] = ..., paused: _Optional[bool] = ..., spec: _Optional[_Union[LearnerSpec, _Mapping]] = ..., updates_applied: _Optional[int] = ..., updates_rejected: _Optional[int] = ..., rollbacks: _Optional[int] = ..., steps: _Optional[int] = ..., serving_version: _Optional[int] = ..., drift_detections: _Optional[int] = ..., pause_reason: _Optional[str] = ..., rollout: _Optional[_Union[Rollout, _Mapping]] = ..., labels_consumed: _Optional[int] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("candidate_version", "champion_version", "stage", "fraction")
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHAMPION_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    candidate_version: int
    champion_version: int
    stage: int
    fraction: float
    def __init__(self, candidate_version: _Optional[int] = ..., champion_version: _Optional[int] = ..., stage: _Optional[int] = ..., fraction: _Optional[float] = ...) -> None: ...

class RebaselineRequest(_message.Message):
    __slots__ = ("model", "window_s", "epochs", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    window_s: float
    epochs: int
    reason: str
    def __init__(self, model: _Optional[str] = ..., window_s: _Optional[float] = ..., epochs: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortRolloutRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "features", "prediction_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    features: _containers.RepeatedScalarFieldContainer[float]
    prediction_id: str
    def __init__(self, model: _Optional[str] = ..., features: _Optional[_Iterable[float]] = ..., prediction_id: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("prediction_id", "score", "model_version", "params_digest", "decision")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    score: float
    model_version: int
    params_digest: str
    decision: float
    def __init__(self, prediction_id: _Optional[str] = ..., score: _Optional[float] = ..., model_version: _Optional[int] = ..., params_digest: _Optional[str] = ..., decision: _Optional[float] = ...) -> None: ...

class PredictRow(_message.Message):
    __slots__ = ("features", "prediction_id")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[float]
    prediction_id: str
    def __init__(self, features: _Optional[_Iterable[float]] = ..., prediction_id: _Optional[str] = ...) -> None: ...

class PredictBatchRequest(_message.Message):
    __slots__ = ("model", "rows")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    model: str
    rows: _containers.RepeatedCompositeFieldContainer[PredictRow]
    def __init__(self, model: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[PredictRow, _Mapping]]] = ...) -> None: ...

class PredictBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PredictResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[PredictResponse, _Mapping]]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("prediction_id", "label", "event_time", "source")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    label: float
    event_time: _timestamp_pb2.Timestamp
    source: str
    def __init__(self, prediction_id: _Optional[str] = ..., label: _Optional[float] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("status", "prediction_id")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[FeedbackResponse.Status]
        ACCEPTED: _ClassVar[FeedbackResponse.Status]
        DUPLICATE: _ClassVar[FeedbackResponse.Status]
        LATE: _ClassVar[FeedbackResponse.Status]
    STATUS_UNSPECIFIED: FeedbackResponse.Status
    ACCEPTED: FeedbackResponse.Status
    DUPLICATE: FeedbackResponse.Status
    LATE: FeedbackResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    status: FeedbackResponse.Status
    prediction_id: str
    def __init__(self, status: _Optional[_Union[FeedbackResponse.Status, str]] = ..., prediction_id: _Optional[str] = ...) -> None: ...

class FeedbackBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[FeedbackRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[FeedbackRequest, _Mapping]]] = ...) -> None: ...

class FeedbackError(_message.Message):
    __slots__ = ("index", "prediction_id", "code", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    prediction_id: str
    code: str
    message: str
    def __init__(self, index: _Optional[int] = ..., prediction_id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class FeedbackSummary(_message.Message):
    __slots__ = ("accepted", "duplicate", "late", "rejected", "errors")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicate: int
    late: int
    rejected: int
    errors: _containers.RepeatedCompositeFieldContainer[FeedbackError]
    def __init__(self, accepted: _Optional[int] = ..., duplicate: _Optional[int] = ..., late: _Optional[int] = ..., rejected: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[FeedbackError, _Mapping]]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "event", "time", "batch_size", "params_digest", "loss_before", "loss_after", "actor", "detail")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    version: int
    event: str
    time: _timestamp_pb2.Timestamp
    batch_size: int
    params_digest: str
    loss_before: float
    loss_after: float
    actor: str
    detail: str
    def __init__(self, version: _Optional[int] = ..., event: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., batch_size: _Optional[int] = ..., params_digest: _Optional[str] = ..., loss_before: _Optional[float] = ..., loss_after: _Optional[float] = ..., actor: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("model", "versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, model: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("model", "version", "as_of", "features")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    as_of: _timestamp_pb2.Timestamp
    features: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., features: _Optional[_Iterable[float]] = ...) -> None: ...

class GetStateResponse(_message.Message):
    __slots__ = ("model", "version", "params_digest", "steps", "score", "decision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    params_digest: str
    steps: int
    score: float
    decision: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., params_digest: _Optional[str] = ..., steps: _Optional[int] = ..., score: _Optional[float] = ..., decision: _Optional[float] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model", "to_version", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    to_version: int
    reason: str
    def __init__(self, model: _Optional[str] = ..., to_version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("prediction_id",)
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    def __init__(self, prediction_id: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("prediction_id", "model", "model_version", "params_digest", "score", "recomputed_score", "decision", "top_reasons", "report_json")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TOP_REASONS_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    model: str
    model_version: int
    params_digest: str
    score: float
    recomputed_score: float
    decision: float
    top_reasons: _containers.RepeatedScalarFieldContainer[str]
    report_json: str
    def __init__(self, prediction_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., params_digest: _Optional[str] = ..., score: _Optional[float] = ..., recomputed_score: _Optional[float] = ..., decision: _Optional[float] = ..., top_reasons: _Optional[_Iterable[str]] = ..., report_json: _Optional[str] = ...) -> None: ...

class VerifyAuditRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelVerification(_message.Message):
    __slots__ = ("model", "verified", "versions_checked", "updates_replayed", "divergence_version", "divergence_event", "recorded_digest", "replayed_digest", "platform_differs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    DIVERGENCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIVERGENCE_EVENT_FIELD_NUMBER: _ClassVar[int]
    RECORDED_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_DIFFERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    verified: bool
    versions_checked: int
    updates_replayed: int
    divergence_version: int
    divergence_event: str
    recorded_digest: str
    replayed_digest: str
    platform_differs: bool
    def __init__(self, model: _Optional[str] = ..., verified: _Optional[bool] = ..., versions_checked: _Optional[int] = ..., updates_replayed: _Optional[int] = ..., divergence_version: _Optional[int] = ..., divergence_event: _Optional[str] = ..., recorded_digest: _Optional[str] = ..., replayed_digest: _Optional[str] = ..., platform_differs: _Optional[bool] = ...) -> None: ...

class VerifyAuditResponse(_message.Message):
    __slots__ = ("verified", "versions_checked", "updates_replayed", "models")
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    verified: bool
    versions_checked: int
    updates_replayed: int
    models: _containers.RepeatedCompositeFieldContainer[ModelVerification]
    def __init__(self, verified: _Optional[bool] = ..., versions_checked: _Optional[int] = ..., updates_replayed: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelVerification, _Mapping]]] = ...) -> None: ...

class WatchModelRequest(_message.Message):
    __slots__ = ("model", "from_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    from_version: int
    def __init__(self, model: _Optional[str] = ..., from_version: _Optional[int] = ...) -> None: ...

class ModelVersionChanged(_message.Message):
    __slots__ = ("model", "version", "event", "params_digest", "time", "actor")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    event: str
    params_digest: str
    time: _timestamp_pb2.Timestamp
    actor: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., event: _Optional[str] = ..., params_digest: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ...) -> None: ...
