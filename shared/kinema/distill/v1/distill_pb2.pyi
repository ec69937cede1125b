import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from kinema.common.v1 import common_pb2 as _common_pb2
from kinema.denoiser.v1 import denoiser_pb2 as _denoiser_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DistillationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISTILLATION_STATE_UNSPECIFIED: _ClassVar[DistillationState]
    DISTILLATION_STATE_QUEUED: _ClassVar[DistillationState]
    DISTILLATION_STATE_RUNNING: _ClassVar[DistillationState]
    DISTILLATION_STATE_COMPLETED: _ClassVar[DistillationState]
    DISTILLATION_STATE_FAILED: _ClassVar[DistillationState]
    DISTILLATION_STATE_CANCELLED: _ClassVar[DistillationState]
DISTILLATION_STATE_UNSPECIFIED: DistillationState
DISTILLATION_STATE_QUEUED: DistillationState
DISTILLATION_STATE_RUNNING: DistillationState
DISTILLATION_STATE_COMPLETED: DistillationState
DISTILLATION_STATE_FAILED: DistillationState
DISTILLATION_STATE_CANCELLED: DistillationState

class SampleRequest(_message.Message):
    __slots__ = ("model", "noise", "cond", "steps", "timesteps", "seed", "seeds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    COND_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    noise: _common_pb2.Tensor
    cond: _denoiser_pb2.Conditioning
    steps: int
    timesteps: _containers.RepeatedScalarFieldContainer[float]
    seed: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., noise: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., cond: _Optional[_Union[_denoiser_pb2.Conditioning, _Mapping]] = ..., steps: _Optional[int] = ..., timesteps: _Optional[_Iterable[float]] = ..., seed: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: SampleResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[SampleResult, _Mapping]] = ...) -> None: ...

class SampleResult(_message.Message):
    __slots__ = ("latents", "model", "timesteps")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    latents: _common_pb2.Tensor
    model: _common_pb2.ModelInfo
    timesteps: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., timesteps: _Optional[_Iterable[float]] = ...) -> None: ...

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

class StartDistillationRequest(_message.Message):
    __slots__ = ("teacher", "student_steps", "train_steps", "max_seconds", "teacher_samples", "batch", "seed", "name", "eval_prompts")
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVAL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    teacher: _common_pb2.ModelRef
    student_steps: int
    train_steps: int
    max_seconds: float
    teacher_samples: int
    batch: int
    seed: int
    name: str
    eval_prompts: int
    def __init__(self, teacher: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., student_steps: _Optional[int] = ..., train_steps: _Optional[int] = ..., max_seconds: _Optional[float] = ..., teacher_samples: _Optional[int] = ..., batch: _Optional[int] = ..., seed: _Optional[int] = ..., name: _Optional[str] = ..., eval_prompts: _Optional[int] = ...) -> None: ...

class StartDistillationResponse(_message.Message):
    __slots__ = ("distillation",)
    DISTILLATION_FIELD_NUMBER: _ClassVar[int]
    distillation: Distillation
    def __init__(self, distillation: _Optional[_Union[Distillation, _Mapping]] = ...) -> None: ...

class GetDistillationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetDistillationResponse(_message.Message):
    __slots__ = ("distillation",)
    DISTILLATION_FIELD_NUMBER: _ClassVar[int]
    distillation: Distillation
    def __init__(self, distillation: _Optional[_Union[Distillation, _Mapping]] = ...) -> None: ...

class CancelDistillationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelDistillationResponse(_message.Message):
    __slots__ = ("distillation",)
    DISTILLATION_FIELD_NUMBER: _ClassVar[int]
    distillation: Distillation
    def __init__(self, distillation: _Optional[_Union[Distillation, _Mapping]] = ...) -> None: ...

class DistillationError(_message.Message):
    __slots__ = ("code", "message", "detail")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    detail: _common_pb2.ErrorDetail
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., detail: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class Distillation(_message.Message):
    __slots__ = ("id", "state", "request", "progress", "teacher", "student", "metrics", "artifacts", "error", "created_at", "started_at", "finished_at", "attempts", "cancel_requested")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: DistillationState
    request: StartDistillationRequest
    progress: _common_pb2.Progress
    teacher: _common_pb2.ModelInfo
    student: _common_pb2.ModelInfo
    metrics: _struct_pb2.Struct
    artifacts: _containers.RepeatedCompositeFieldContainer[_common_pb2.ArtifactRef]
    error: DistillationError
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    attempts: int
    cancel_requested: bool
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[DistillationState, str]] = ..., request: _Optional[_Union[StartDistillationRequest, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., teacher: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., student: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., artifacts: _Optional[_Iterable[_Union[_common_pb2.ArtifactRef, _Mapping]]] = ..., error: _Optional[_Union[DistillationError, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., cancel_requested: _Optional[bool] = ...) -> None: ...
