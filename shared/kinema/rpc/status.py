"""The one place mapping Kinema domain errors to gRPC status codes, details and `kinema-error-bin` trailers,
and back again on the client side (`from_rpc_error`).

An error with a retry hint (`KinemaError.retry_after`: a busy server's RESOURCE_EXHAUSTED) also carries it in two
standard places: the gRPC rich error model (`grpc-status-details-bin`: a `google.rpc.Status` holding a
`google.rpc.RetryInfo`, and a `google.rpc.ErrorInfo` with the reason), which grpcurl and the gRPC libraries of
other languages read, and a plain `retry-after-ms` trailer (milliseconds, ASCII) for clients without them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from kinema import errors
from kinema.common.v1 import common_pb2

_LOGGER = logging.getLogger(__name__)

ERROR_DETAIL_KEY = "kinema-error-bin"
STATUS_DETAILS_KEY = "grpc-status-details-bin"  # the gRPC rich error model: a serialized google.rpc.Status
RETRY_AFTER_KEY = "retry-after-ms"
ERROR_DOMAIN = "kinema"  # google.rpc.ErrorInfo.domain of Kinema's reasons

# Most specific first: DeadlineExceeded is also a TimeoutError, InvalidInput also a ValueError.
CODES: tuple[tuple[type[errors.KinemaError], grpc.StatusCode], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)


@dataclass(frozen=True)
class RpcStatus:
    """What a failed call returns to its client."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


def to_status(exc: BaseException, request_id: str = "") -> RpcStatus:
    """The client-facing status of `exc`; anything not a mapped domain error is a generic INTERNAL.

    A servicer's asyncio.CancelledError is never aborted with: the interceptor lets it propagate (the client is
    gone or its deadline passed); it maps to CANCELLED here only for logs and metrics.
    """
    if isinstance(exc, asyncio.CancelledError):
        return RpcStatus(grpc.StatusCode.CANCELLED, "cancelled")
    for kind, code in CODES:
        if isinstance(exc, kind):
            details = str(exc) or code.name.lower().replace("_", " ")
            return RpcStatus(code, details, _trailer(exc, request_id) + _retry_trailer(exc, code, details))
    # The message and traceback of an unexpected error may hold internals: they go to the server log only.
    return RpcStatus(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id or 'unknown'})")


def error_detail(exc: errors.KinemaError, request_id: str = "") -> common_pb2.ErrorDetail:
    """The machine-readable `ErrorDetail` of a domain error."""
    metadata = dict(getattr(exc, "metadata", {}) or {})
    if request_id:
        metadata.setdefault("request_id", request_id)
    return common_pb2.ErrorDetail(
        reason=getattr(exc, "reason", "") or "", field=getattr(exc, "field", "") or "", metadata=metadata
    )


def parse_error_detail(trailing_metadata: object) -> common_pb2.ErrorDetail | None:
    """The `ErrorDetail` in a call's trailing metadata (client side), or None."""
    for key, value in trailing_metadata or ():
        if key == ERROR_DETAIL_KEY:
            return common_pb2.ErrorDetail.FromString(value)
    return None


def parse_retry_after(trailing_metadata: object) -> float | None:
    """The retry hint in a call's trailing metadata (client side), in seconds: the `google.rpc.RetryInfo` of the
    rich error details, else the `retry-after-ms` trailer; None when the server gave none."""
    pairs = list(trailing_metadata or ())
    for key, value in pairs:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:  # a malformed header (some proxy's): fall back to the plain trailer
                break
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.ToTimedelta().total_seconds()
    for key, value in pairs:
        if key == RETRY_AFTER_KEY:
            try:
                ms = float(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return None
            return ms / 1000 if ms >= 0 and ms == ms else None
    return None


def from_rpc_error(err: grpc.RpcError) -> errors.KinemaError:
    """The domain error a failed call stands for (client side): the inverse of `to_status`, by the same `CODES`.

    The message is the status details; `reason`, `field` and `metadata` (with the server's "request_id") come
    from the `kinema-error-bin` trailer when the server sent one, `retry_after` from the retry hint (see
    `parse_retry_after`). Codes no domain error maps to (INTERNAL, UNKNOWN, CANCELLED, UNIMPLEMENTED, ...) give a
    plain KinemaError whose reason, if the trailer has none, is the code's name. `metadata["grpc_code"]` always
    holds the code's name.
    """
    code = _attr(err, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN  # a bare RpcError (no call attached) says nothing more
    trailing = _attr(err, "trailing_metadata")
    detail = parse_error_detail(trailing)
    kind = next((k for k, c in CODES if c == code), errors.KinemaError)
    reason = detail.reason if detail is not None else ""
    if not reason and kind is errors.KinemaError:
        reason = code.name
    metadata = dict(detail.metadata) if detail is not None else {}
    metadata["grpc_code"] = code.name
    message = _attr(err, "details") or code.name.lower().replace("_", " ")
    return kind(message, reason=reason, field=detail.field if detail is not None else "", metadata=metadata,
                retry_after=parse_retry_after(trailing))  # fmt: skip


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str = "") -> None:
    """End the call with the status of `exc`; always raises (grpc.aio.AbortError)."""
    status = to_status(exc, request_id)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


def _trailer(exc: errors.KinemaError, request_id: str) -> tuple[tuple[str, bytes], ...]:
    if not (getattr(exc, "reason", "") or getattr(exc, "field", "")):
        return ()
    return ((ERROR_DETAIL_KEY, error_detail(exc, request_id).SerializeToString()),)


def _retry_trailer(exc: errors.KinemaError, code: grpc.StatusCode, details: str) -> tuple[tuple[str, str | bytes], ...]:
    """The retry hint of `exc`, if it has one, as rich error details and as `retry-after-ms`."""
    seconds = getattr(exc, "retry_after", None)
    if seconds is None:
        return ()
    seconds = max(0.0, float(seconds))
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(seconds * 1e9))
    status = status_pb2.Status(code=code.value[0], message=details)  # must repeat the call's code and message
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    if getattr(exc, "reason", ""):
        info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN,
                                           metadata={k: str(v) for k, v in exc.metadata.items()})  # fmt: skip
        status.details.add().Pack(info)
    return (STATUS_DETAILS_KEY, status.SerializeToString()), (RETRY_AFTER_KEY, str(round(seconds * 1000)))


def _attr(err: grpc.RpcError, name: str) -> object:
    """`err.<name>()` where the error is also a `grpc.Call` (every error a real call raises), else None."""
    method = getattr(err, name, None)
    return method() if callable(method) else None
