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
TRAVERSE_MODE_UNSPECIFIED: TraverseMode
TRAVERSE_MODE_SET: TraverseMode
TRAVERSE_MODE_SHIFT: TraverseMode

class FactorizeRequest(_message.Message):
    __slots__ = ("model", "latents")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    latents: _common_pb2.Tensor
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class FactorizeResponse(_message.Message):
    __slots__ = ("factors", "factor_names", "residual", "model")
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    FACTOR_NAMES_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    factors: _common_pb2.Tensor
    factor_names: _containers.RepeatedScalarFieldContainer[str]
    residual: _common_pb2.Tensor
    model: _common_pb2.ModelInfo
    def __init__(self, factors: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., factor_names: _Optional[_Iterable[str]] = ..., residual: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class ComposeRequest(_message.Message):
    __slots__ = ("model", "factors", "residual")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    factors: _common_pb2.Tensor
    residual: _common_pb2.Tensor
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., factors: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., residual: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

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
