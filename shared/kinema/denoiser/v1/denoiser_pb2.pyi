from kinema.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Conditioning(_message.Message):
    __slots__ = ("tokens", "mask", "pooled")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    tokens: _common_pb2.Tensor
    mask: _common_pb2.Tensor
    pooled: _common_pb2.Tensor
    def __init__(self, tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., pooled: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("model", "noise", "cond", "uncond", "steps", "guidance", "sampler", "shift", "preview_every", "init_latents", "start_step", "mask")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    COND_FIELD_NUMBER: _ClassVar[int]
    UNCOND_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    INIT_LATENTS_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    noise: _common_pb2.Tensor
    cond: Conditioning
    uncond: Conditioning
    steps: int
    guidance: float
    sampler: str
    shift: float
    preview_every: int
    init_latents: _common_pb2.Tensor
    start_step: int
    mask: _common_pb2.Tensor
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., noise: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., cond: _Optional[_Union[Conditioning, _Mapping]] = ..., uncond: _Optional[_Union[Conditioning, _Mapping]] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., sampler: _Optional[str] = ..., shift: _Optional[float] = ..., preview_every: _Optional[int] = ..., init_latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., start_step: _Optional[int] = ..., mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: SampleResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[SampleResult, _Mapping]] = ...) -> None: ...

class SampleResult(_message.Message):
    __slots__ = ("latents", "model")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    latents: _common_pb2.Tensor
    model: _common_pb2.ModelInfo
    def __init__(self, latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class SampleVideoRequest(_message.Message):
    __slots__ = ("model", "noise", "cond", "reference_latent", "uncond", "steps", "guidance", "temporal_guidance", "structure", "structure_level", "shift", "start_step", "init_latents", "window", "overlap")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    COND_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LATENT_FIELD_NUMBER: _ClassVar[int]
    UNCOND_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    TEMPORAL_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    INIT_LATENTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    noise: _common_pb2.Tensor
    cond: Conditioning
    reference_latent: _common_pb2.Tensor
    uncond: Conditioning
    steps: int
    guidance: float
    temporal_guidance: float
    structure: _common_pb2.Tensor
    structure_level: float
    shift: float
    start_step: int
    init_latents: _common_pb2.Tensor
    window: int
    overlap: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., noise: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., cond: _Optional[_Union[Conditioning, _Mapping]] = ..., reference_latent: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., uncond: _Optional[_Union[Conditioning, _Mapping]] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., temporal_guidance: _Optional[float] = ..., structure: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., structure_level: _Optional[float] = ..., shift: _Optional[float] = ..., start_step: _Optional[int] = ..., init_latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., window: _Optional[int] = ..., overlap: _Optional[int] = ...) -> None: ...

class SampleVideoResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: SampleVideoResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[SampleVideoResult, _Mapping]] = ...) -> None: ...

class SampleVideoResult(_message.Message):
    __slots__ = ("latents", "model")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    latents: _common_pb2.Tensor
    model: _common_pb2.ModelInfo
    def __init__(self, latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "x", "t", "cond")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    COND_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    x: _common_pb2.Tensor
    t: _common_pb2.Tensor
    cond: Conditioning
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., x: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., t: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., cond: _Optional[_Union[Conditioning, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("velocity", "model")
    VELOCITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    velocity: _common_pb2.Tensor
    model: _common_pb2.ModelInfo
    def __init__(self, velocity: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model", "default_video_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VIDEO_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    default_model: str
    default_video_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., default_video_model: _Optional[str] = ...) -> None: ...
