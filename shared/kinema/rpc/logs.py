"""JSON logs, one object per line, carrying the current request's id, service and method."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class RequestContext:
    """The RPC being handled in the current task (set by the server's interceptor)."""

    request_id: str
    service: str
    method: str
    started: float  # time.monotonic() when the handler started


_REQUEST: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("kinema_request", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def current_request() -> RequestContext | None:
    """The RPC the calling task serves, or None outside a request."""
    return _REQUEST.get()


def request_id() -> str | None:
    """The current request id, or None outside a request."""
    ctx = _REQUEST.get()
    return ctx.request_id if ctx else None


def set_request(ctx: RequestContext | None) -> None:
    """Make `ctx` the current request of this task's context (the server does this once per RPC task)."""
    _REQUEST.set(ctx)


@contextmanager
def bind_request(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make `ctx` the current request for the duration of the block (and tasks it creates)."""
    token = _REQUEST.set(ctx)
    try:
        yield ctx
    finally:
        _REQUEST.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, service, method, then `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        ctx = _REQUEST.get()
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": ctx.request_id if ctx else None,
            "service": ctx.service if ctx else None,
            "method": ctx.method if ctx else None,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _KinemaHandler(logging.StreamHandler):
    """Marks the handler configure_logging installed, so calling it again replaces rather than duplicates."""


def configure_logging(level: str | int = "INFO", stream=None) -> None:
    """Send every log record of the process as JSON lines to `stream` (default stderr) at `level` and above."""
    if isinstance(level, str):
        numeric = logging.getLevelName(level.upper())
        if not isinstance(numeric, int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        level = numeric
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _KinemaHandler)]:
        root.removeHandler(handler)
    handler = _KinemaHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
