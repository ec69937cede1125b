import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from kinema.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TraverseMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAVERSE_MODE_UNSPECIFIED: _ClassVar[TraverseMode]
    TRAVERSE_MODE_SET: _ClassVar[TraverseMode]
    TRAVERSE_MODE_SHIFT: _ClassVar[TraverseMode]

class FittingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FITTING_STATE_UNSPECIFIED: _ClassVar[FittingState]
    FITTING_STATE_QUEUED: _ClassVar[FittingState]
    FITTING_STATE_RUNNING: _ClassVar[FittingState]
    FITTING_STATE_COMPLETED: _ClassVar[FittingState]
    FITTING_STATE_FAILED: _ClassVar[FittingState]
    FITTING_STATE_CANCELLED: _ClassVar[FittingState]
TRAVERSE_MODE_UNSPECIFIED: TraverseMode
TRAVERSE_MODE_SET: TraverseMode
TRAVERSE_MODE_SHIFT: TraverseMode
FITTING_STATE_UNSPECIFIED: FittingState
FITTING_STATE_QUEUED: FittingState
FITTING_STATE_RUNNING: FittingState
FITTING_STATE_COMPLETED: FittingState
FITTING_STATE_FAILED: FittingState
FITTING_STATE_CANCELLED: FittingState

class FactorizeRequest(_message.Message):
    __slots__ = ("model", "latents")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    latents: _common_pb2.Tensor
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class FactorizeResponse(_message.Message):
    __slots__ = ("factors", "factor_names", "residual", "model", "outside")
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    FACTOR_NAMES_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTSIDE_FIELD_NUMBER: _ClassVar[int]
    factors: _common_pb2.Tensor
    factor_names: _containers.RepeatedScalarFieldContainer[str]
    residual: _common_pb2.Tensor
    model: _common_pb2.ModelInfo
    outside: _common_pb2.Tensor
    def __init__(self, factors: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., factor_names: _Optional[_Iterable[str]] = ..., residual: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., outside: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ComposeRequest(_message.Message):
    __slots__ = ("model", "factors", "residual", "outside")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    OUTSIDE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    factors: _common_pb2.Tensor
    residual: _common_pb2.Tensor
    outside: _common_pb2.Tensor
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., factors: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., residual: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., outside: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ComposeResponse(_message.Message):
    __slots__ = ("latents", "model")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    latents: _common_pb2.Tensor
    model: _common_pb2.ModelInfo
    def __init__(self, latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class TraverseRequest(_message.Message):
    __slots__ = ("model", "latents", "factor", "mode", "value", "scales")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    latents: _common_pb2.Tensor
    factor: str
    mode: TraverseMode
    value: _common_pb2.Tensor
    scales: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., factor: _Optional[str] = ..., mode: _Optional[_Union[TraverseMode, str]] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., scales: _Optional[_Iterable[float]] = ...) -> None: ...

class TraverseResponse(_message.Message):
    __slots__ = ("latents", "model")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    latents: _common_pb2.Tensor
    model: _common_pb2.ModelInfo
    def __init__(self, latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("model", "images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    images: _common_pb2.Tensor
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., images: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class FactorScores(_message.Message):
    __slots__ = ("factor", "values", "scores", "best")
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    factor: str
    values: _containers.RepeatedScalarFieldContainer[str]
    scores: _common_pb2.Tensor
    best: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, factor: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., scores: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., best: _Optional[_Iterable[str]] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("factors", "model", "autoencoder")
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUTOENCODER_FIELD_NUMBER: _ClassVar[int]
    factors: _containers.RepeatedCompositeFieldContainer[FactorScores]
    model: _common_pb2.ModelInfo
    autoencoder: _common_pb2.ModelInfo
    def __init__(self, factors: _Optional[_Iterable[_Union[FactorScores, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., autoencoder: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("model", "images", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    images: _common_pb2.Tensor
    values: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., images: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("images", "model", "autoencoder")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUTOENCODER_FIELD_NUMBER: _ClassVar[int]
    images: _common_pb2.Tensor
    model: _common_pb2.ModelInfo
    autoencoder: _common_pb2.ModelInfo
    def __init__(self, images: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., autoencoder: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class TranslateRequest(_message.Message):
    __slots__ = ("model", "source", "seed", "temperature", "decode")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    source: _common_pb2.Tensor
    seed: int
    temperature: float
    decode: bool
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., source: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., seed: _Optional[int] = ..., temperature: _Optional[float] = ..., decode: _Optional[bool] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("latents", "images", "model", "autoencoder")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUTOENCODER_FIELD_NUMBER: _ClassVar[int]
    latents: _common_pb2.Tensor
    images: _common_pb2.Tensor
    model: _common_pb2.ModelInfo
    autoencoder: _common_pb2.ModelInfo
    def __init__(self, latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., images: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., autoencoder: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class FactorData(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: int
    def __init__(self, samples: _Optional[int] = ...) -> None: ...

class FitRequest(_message.Message):
    __slots__ = ("kind", "representation", "data", "train_steps", "max_seconds", "batch", "components", "factor_dims", "noise", "rho", "seed", "name", "eval_samples")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REPRESENTATION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    FACTOR_DIMS_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    representation: str
    data: FactorData
    train_steps: int
    max_seconds: float
    batch: int
    components: int
    factor_dims: _containers.RepeatedScalarFieldContainer[int]
    noise: float
    rho: float
    seed: int
    name: str
    eval_samples: int
    def __init__(self, kind: _Optional[str] = ..., representation: _Optional[str] = ..., data: _Optional[_Union[FactorData, _Mapping]] = ..., train_steps: _Optional[int] = ..., max_seconds: _Optional[float] = ..., batch: _Optional[int] = ..., components: _Optional[int] = ..., factor_dims: _Optional[_Iterable[int]] = ..., noise: _Optional[float] = ..., rho: _Optional[float] = ..., seed: _Optional[int] = ..., name: _Optional[str] = ..., eval_samples: _Optional[int] = ...) -> None: ...

class FitResponse(_message.Message):
    __slots__ = ("fitting",)
    FITTING_FIELD_NUMBER: _ClassVar[int]
    fitting: Fitting
    def __init__(self, fitting: _Optional[_Union[Fitting, _Mapping]] = ...) -> None: ...

class GetFittingRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetFittingResponse(_message.Message):
    __slots__ = ("fitting",)
    FITTING_FIELD_NUMBER: _ClassVar[int]
    fitting: Fitting
    def __init__(self, fitting: _Optional[_Union[Fitting, _Mapping]] = ...) -> None: ...

class CancelFittingRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelFittingResponse(_message.Message):
    __slots__ = ("fitting",)
    FITTING_FIELD_NUMBER: _ClassVar[int]
    fitting: Fitting
    def __init__(self, fitting: _Optional[_Union[Fitting, _Mapping]] = ...) -> None: ...

class FittingError(_message.Message):
    __slots__ = ("code", "message", "detail")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    detail: _common_pb2.ErrorDetail
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., detail: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class Fitting(_message.Message):
    __slots__ = ("id", "state", "request", "progress", "representation", "model", "metrics", "artifacts", "error", "created_at", "started_at", "finished_at", "attempts", "cancel_requested")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPRESENTATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: FittingState
    request: FitRequest
    progress: _common_pb2.Progress
    representation: _common_pb2.ModelInfo
    model: _common_pb2.ModelInfo
    metrics: _struct_pb2.Struct
    artifacts: _containers.RepeatedCompositeFieldContainer[_common_pb2.ArtifactRef]
    error: FittingError
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    attempts: int
    cancel_requested: bool
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[FittingState, str]] = ..., request: _Optional[_Union[FitRequest, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., representation: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., artifacts: _Optional[_Iterable[_Union[_common_pb2.ArtifactRef, _Mapping]]] = ..., error: _Optional[_Union[FittingError, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., cancel_requested: _Optional[bool] = ...) -> None: ...
