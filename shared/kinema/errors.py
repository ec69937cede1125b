"""Typed domain errors; services map them to gRPC status codes in one place."""


class KinemaError(Exception):
    """Base of every error Kinema raises on purpose."""


class InvalidInput(KinemaError, ValueError):
    """The request is malformed or out of range (INVALID_ARGUMENT)."""


class NotFound(KinemaError, LookupError):
    """A named model, artifact or job does not exist (NOT_FOUND)."""


class Unavailable(KinemaError):
    """A dependency is down or not ready (UNAVAILABLE)."""
