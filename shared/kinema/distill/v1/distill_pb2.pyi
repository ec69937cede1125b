from kinema.common.v1 import common_pb2 as _common_pb2
from kinema.denoiser.v1 import denoiser_pb2 as _denoiser_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
