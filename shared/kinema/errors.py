"""Typed domain errors; services map them to gRPC status codes in one place (`kinema.rpc.status`)."""

from __future__ import annotations

from collections.abc import Mapping


class KinemaError(Exception):
    """Base of every error Kinema raises on purpose.

    `reason` is a stable UPPER_SNAKE code ("INVALID_SHAPE", "MODEL_NOT_FOUND") and `field` the dotted
    request field at fault; both are optional and travel to gRPC clients as a `kinema.common.v1.ErrorDetail`.
    `retry_after` (seconds) says that the same call may succeed if tried again that much later (a busy server);
    it travels as the standard `google.rpc.RetryInfo` and a `retry-after-ms` trailer (`kinema.rpc.status`).
    """

    def __init__(
        self,
        *args: object,
        reason: str = "",
        field: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(*args)
        self.reason = reason
        self.field = field
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after


class InvalidInput(KinemaError, ValueError):
    """The request is malformed or out of range (INVALID_ARGUMENT)."""


class NotFound(KinemaError, LookupError):
    """A named model, artifact or job does not exist (NOT_FOUND)."""


class FailedPrecondition(KinemaError):
    """The request is well formed but what it names is not ready for it: a model not fitted (FAILED_PRECONDITION)."""


class AlreadyExists(KinemaError):
    """What the request would create exists already, or is being made: a reused idempotency key, a second
    distillation of a teacher while one runs (ALREADY_EXISTS); `metadata` names the existing one."""


class Unavailable(KinemaError):
    """A dependency is down or not ready (UNAVAILABLE)."""


class ResourceExhausted(KinemaError):
    """A quota, batch limit or memory budget is exceeded, or the server is full right now and `retry_after` says
    when to try again (RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(KinemaError, TimeoutError):
    """The work could not finish within its deadline (DEADLINE_EXCEEDED)."""


class Unauthenticated(KinemaError):
    """The call carries no valid credentials (UNAUTHENTICATED)."""


class PermissionDenied(KinemaError):
    """The caller is known but may not do this (PERMISSION_DENIED)."""


class DataLoss(KinemaError):
    """Stored data no longer matches its hash: corruption in a store, not a client error (DATA_LOSS)."""
