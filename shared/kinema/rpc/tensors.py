"""The one tensor codec: numpy / torch arrays <-> `kinema.common.v1.Tensor` (dtype, shape, raw little-endian bytes).

`decode` validates everything a client controls and raises `InvalidInput` naming the request field, so a
servicer can call it on request fields directly. It is zero-copy: the returned array views the message's
bytes and is read-only; pass `writable=True` (one copy) when the caller must modify it in place or hand it
to `torch.from_numpy`.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import numpy as np

from kinema.common.v1 import common_pb2
from kinema.errors import InvalidInput

if TYPE_CHECKING:
    import torch

DType = common_pb2.DType

# Wire dtype -> little-endian numpy dtype of the bytes on the wire.
_WIRE: dict[int, np.dtype] = {
    DType.DTYPE_FLOAT32: np.dtype("<f4"),
    DType.DTYPE_FLOAT16: np.dtype("<f2"),
    DType.DTYPE_BFLOAT16: np.dtype("<u2"),  # raw bits; widened to float32 on decode
    DType.DTYPE_INT64: np.dtype("<i8"),
    DType.DTYPE_INT32: np.dtype("<i4"),
    DType.DTYPE_UINT8: np.dtype("u1"),
    DType.DTYPE_BOOL: np.dtype("?"),
}
# Wire dtype -> dtype of the array `decode` returns.
_DECODED: dict[int, np.dtype] = {**_WIRE, DType.DTYPE_BFLOAT16: np.dtype(np.float32)}
_FROM_NUMPY: dict[str, int] = {
    "float32": DType.DTYPE_FLOAT32,
    "float16": DType.DTYPE_FLOAT16,
    "bfloat16": DType.DTYPE_BFLOAT16,  # ml_dtypes.bfloat16, when a caller has it
    "int64": DType.DTYPE_INT64,
    "int32": DType.DTYPE_INT32,
    "uint8": DType.DTYPE_UINT8,
    "bool": DType.DTYPE_BOOL,
}
SUPPORTED = tuple(DType.Name(d).removeprefix("DTYPE_").lower() for d in _WIRE)  # for messages
MAX_DIM = 1 << 31  # largest size of one tensor dimension a request may declare


def encode(array: np.ndarray | torch.Tensor) -> common_pb2.Tensor:
    """A numpy array or torch tensor (any device, any layout) as a wire Tensor; bfloat16 stays bfloat16.

    Raises ValueError for a dtype the wire format lacks (e.g. float64: cast first); that is a server bug,
    not bad input.
    """
    torch = sys.modules.get("torch")  # never import torch just to find out the input is not a tensor
    if torch is not None and isinstance(array, torch.Tensor):
        t = array.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            bits = t.view(torch.int16).numpy()  # (...) raw bfloat16 bits
            return common_pb2.Tensor(dtype=DType.DTYPE_BFLOAT16, shape=t.shape, data=bits.astype("<i2").tobytes())
        array = t.numpy()
    array = np.asarray(array)
    wire = _FROM_NUMPY.get(array.dtype.name)
    if wire is None:
        raise ValueError(f"cannot encode dtype {array.dtype}; supported: {', '.join(SUPPORTED)}")
    if wire == DType.DTYPE_BFLOAT16:
        data = array.view(np.uint16).astype("<u2", copy=False).tobytes()
    else:
        data = array.astype(_WIRE[wire], copy=False).tobytes(order="C")
    return common_pb2.Tensor(dtype=wire, shape=array.shape, data=data)


def decode(
    t: common_pb2.Tensor,
    field: str,
    dtype: np.dtype | type | str | None = np.float32,
    ndim: int | None = None,
    finite: bool = True,
    *,
    writable: bool = False,
) -> np.ndarray:
    """Validate and decode the request Tensor at `field` ("images", "cond.tokens").

    Args:
      dtype: the dtype the caller needs; None accepts any supported dtype. float32 also accepts bfloat16
        on the wire (widened exactly to float32); no other conversion happens.
      ndim: required rank, or None for any.
      finite: reject NaN and +-Inf in floating-point data.
      writable: return a private writable copy instead of a read-only view of the message bytes.

    Raises:
      InvalidInput (reason INVALID_DTYPE, INVALID_SHAPE or NON_FINITE; `field` set) for anything wrong.
    """
    name = _name(t.dtype)
    if t.dtype == DType.DTYPE_UNSPECIFIED:
        raise _invalid(field, "INVALID_DTYPE", f"dtype is unspecified; set it to one of {', '.join(SUPPORTED)}")
    if t.dtype not in _WIRE:
        raise _invalid(field, "INVALID_DTYPE", f"unsupported dtype {name}; use one of {', '.join(SUPPORTED)}")
    wire, out = _WIRE[t.dtype], _DECODED[t.dtype]
    if dtype is not None and out != np.dtype(dtype):
        want = np.dtype(dtype).name
        raise _invalid(field, "INVALID_DTYPE", f"dtype must be {want}, got {name}")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise _invalid(field, "INVALID_SHAPE", f"shape {list(shape)} has a negative dimension")
    if any(d > MAX_DIM for d in shape):  # numpy cannot even describe such an array, empty or not
        raise _invalid(field, "INVALID_SHAPE", f"shape {list(shape)} has a dimension over {MAX_DIM}")
    if math.prod(max(d, 1) for d in shape) * wire.itemsize >= 1 << 62:  # nor one whose other dims overflow, empty
        raise _invalid(field, "INVALID_SHAPE", f"shape {list(shape)} is too large to describe")
    if ndim is not None and len(shape) != ndim:
        raise _invalid(field, "INVALID_SHAPE", f"must have {ndim} dimensions, got shape {list(shape)}")
    expected = math.prod(shape) * wire.itemsize
    if len(t.data) != expected:
        raise _invalid(
            field,
            "INVALID_SHAPE",
            f"data holds {len(t.data)} bytes but shape {list(shape)} of {name} needs {expected}",
        )
    array = np.frombuffer(t.data, dtype=wire).reshape(shape)  # read-only view of the message bytes
    if t.dtype == DType.DTYPE_BFLOAT16:
        # bfloat16 is the top half of a float32: widening is exact and needs no torch.
        # (reshaped, as a 0-d array cannot be viewed as another dtype)
        array = (array.astype(np.uint32).reshape(-1) << 16).view(np.float32).reshape(shape)
    elif not wire.isnative:
        array = array.astype(wire.newbyteorder("="))
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise _invalid(field, "NON_FINITE", "contains NaN or Inf")
    if writable and not array.flags.writeable:
        array = array.copy()
    return array


def _name(dtype: int) -> str:
    return DType.Name(dtype).removeprefix("DTYPE_").lower() if dtype in DType.values() else str(dtype)


def _invalid(field: str, reason: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", reason=reason, field=field)
