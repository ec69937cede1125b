"""Malformed requests for any gRPC method, from its protobuf descriptor (hypothesis strategies).

`messages(Request)` draws messages of any shape the wire allows: every scalar type at its edges (0, -1, int64
extremes, NaN, +-Inf, huge floats), strings of odd Unicode (controls, surrogate-free astral planes, RTL marks, very
long), bytes of any length, enums with unknown numbers, repeated fields from empty to long, nested messages a few
levels deep, and `kinema.common.v1.Tensor` messages whose dtype, shape and data disagree (negative and huge
dimensions, data one byte short). `overrides` pins a field to a strategy of its own, to steer a draw past the first
check (e.g. a known pipeline name). Used by the fuzz tests (a small sample) and `bench/fuzz.py` (thousands).

Nothing here needs a server; `classify` tells an answer the contract allows from one it does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

# What no request may get, however malformed: these mean the server did not handle it.
FORBIDDEN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)

_EDGE_TEXT = ["", " ", "\x00", "\u202eevil", "a\nb\tc", "💥" * 50, "ａ" * 300, "../../etc/passwd", "%s%n", "a" * 5000,
              "'; DROP TABLE jobs; --", "\ufeffbom", "z\u0301\u0301\u0301"]  # fmt: skip
_ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80),
    st.sampled_from(_EDGE_TEXT),
)
_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, -1.0, 1e-45, 3.4e38, float("nan"), float("inf"), -float("inf")]),
)
_DOUBLES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e308]))


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2, 7, 8, 16, 17, 28, 64, 1000, 1001, 4096, 2**31 - 1, 2**53, low, high)
             if low <= v <= high]  # fmt: skip
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


_SCALARS: dict[int, Callable[[FieldDescriptor], st.SearchStrategy[Any]]] = {
    FieldDescriptor.TYPE_DOUBLE: lambda f: _DOUBLES,
    FieldDescriptor.TYPE_FLOAT: lambda f: _FLOATS,
    FieldDescriptor.TYPE_INT64: lambda f: _ints(*INT64),
    FieldDescriptor.TYPE_SINT64: lambda f: _ints(*INT64),
    FieldDescriptor.TYPE_SFIXED64: lambda f: _ints(*INT64),
    FieldDescriptor.TYPE_UINT64: lambda f: _ints(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: lambda f: _ints(0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: lambda f: _ints(*INT32),
    FieldDescriptor.TYPE_SINT32: lambda f: _ints(*INT32),
    FieldDescriptor.TYPE_SFIXED32: lambda f: _ints(*INT32),
    FieldDescriptor.TYPE_UINT32: lambda f: _ints(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: lambda f: _ints(0, 2**32 - 1),
    FieldDescriptor.TYPE_BOOL: lambda f: st.booleans(),
    FieldDescriptor.TYPE_STRING: lambda f: _ODD_TEXT,
    FieldDescriptor.TYPE_BYTES: lambda f: st.one_of(st.binary(max_size=64), st.binary(min_size=1000, max_size=5000)),
    FieldDescriptor.TYPE_ENUM: lambda f: st.one_of(
        st.sampled_from([v.number for v in f.enum_type.values]), _ints(*INT32)
    ),
}


def _tensor(d: Descriptor) -> st.SearchStrategy[dict[str, Any]]:
    """A kinema.common.v1.Tensor as field values: plausible and implausible dtype, shape and data together."""
    dims = st.one_of(st.integers(0, 70), st.sampled_from([-1, 0, 2**31, 2**62, INT64[1]]))
    shape = st.lists(dims, max_size=6)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        dtype = draw(st.one_of(st.sampled_from([v.number for v in d.fields_by_name["dtype"].enum_type.values]),
                               st.integers(-5, 100)))  # fmt: skip
        dims_ = draw(shape)
        count = 1
        for x in dims_:
            count *= max(x, 0)
        size = {1: 4, 2: 2, 3: 2, 4: 8, 5: 4}.get(dtype, 1)
        exact = count * size if 0 <= count * size <= 1 << 16 else 0  # b"\xff" * exact: NaN as float32
        data = draw(st.one_of(st.just(bytes(exact)), st.just(bytes(max(exact - 1, 0))), st.binary(max_size=256),
                              st.just(b"\xff" * exact)))  # fmt: skip
        return {"dtype": dtype, "shape": dims_, "data": data}

    return build()


def _field(f: FieldDescriptor, depth: int, overrides: Mapping[str, st.SearchStrategy[Any]]) -> st.SearchStrategy:
    if f.name in overrides:
        return overrides[f.name]
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        d = f.message_type
        if d.GetOptions().map_entry:
            key = _field(d.fields_by_name["key"], depth, {})
            value = _field(d.fields_by_name["value"], depth - 1, overrides)
            return st.dictionaries(key, value, max_size=3)
        one = _message_values(d, depth - 1, overrides)
    else:
        one = _SCALARS[f.type](f)
    if f.label == FieldDescriptor.LABEL_REPEATED:
        return st.one_of(st.lists(one, max_size=4), st.lists(one, min_size=17, max_size=40))
    return one


def _message_values(d: Descriptor, depth: int, overrides: Mapping[str, st.SearchStrategy[Any]]) -> st.SearchStrategy:
    """Field values of a message `d` as a dict, each field present or not."""
    if d.full_name == "kinema.common.v1.Tensor":
        return _tensor(d)
    if d.full_name.startswith("google.protobuf.") or depth <= 0:
        return st.just({})  # Struct, Value, Timestamp: left empty (their own codecs reject junk client-side)
    fields = {f.name: _field(f, depth, overrides) for f in d.fields}
    return st.fixed_dictionaries({}, optional=fields)


def messages(
    cls: type[Message], depth: int = 3, overrides: Mapping[str, st.SearchStrategy[Any]] | None = None
) -> st.SearchStrategy[Message]:
    """Messages of type `cls`; a draw that protobuf itself refuses to build (e.g. two members of a oneof, whichever
    is set last wins) is built as far as it goes, so every draw is a message the wire can carry."""

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        _fill(msg, values)
        return msg

    return _message_values(cls.DESCRIPTOR, depth, overrides or {}).map(build)


def _fill(msg: Message, values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        f = msg.DESCRIPTOR.fields_by_name[name]
        try:
            if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
                target = getattr(msg, name)
                vf = f.message_type.fields_by_name["value"]
                for k, v in value.items():
                    if vf.type == FieldDescriptor.TYPE_MESSAGE:
                        _fill(target[k], v)
                    else:
                        target[k] = v
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                if f.label == FieldDescriptor.LABEL_REPEATED:
                    for v in value:
                        _fill(getattr(msg, name).add(), v)
                else:
                    getattr(msg, name).SetInParent()
                    _fill(getattr(msg, name), value)
            elif f.label == FieldDescriptor.LABEL_REPEATED:
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        except (ValueError, TypeError):  # e.g. an enum number proto3 keeps but this runtime refuses: skip it
            continue


def classify(call: Callable[[], Any]) -> grpc.StatusCode:
    """Run one call (consuming a response stream) and return its status code (OK when it returned)."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, Message):
            for _ in result:
                pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


__all__ = ["FORBIDDEN", "classify", "messages"]
