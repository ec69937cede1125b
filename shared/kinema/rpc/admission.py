"""Admission control: at most `KINEMA_MAX_IN_FLIGHT` expensive calls at once in one server process.

A call over the limit is refused at once with RESOURCE_EXHAUSTED (reason SERVER_BUSY) and a retry hint, instead of
queueing where nobody sees it: on the worker threads, in Triton, in memory. Refusing costs the server almost
nothing, so it keeps answering the cheap calls (health, ListModels, GetJob) under any load, and a client learns at
once to come back later instead of waiting on a call that may time out. Which calls are expensive is the service's
choice (`kinema.rpc.server.Binding.limited`); the interceptor holds a place for the whole call, a stream's too.

The hint is the time a place takes to free up while all are taken: the mean duration of recent admitted calls over
the number of places, kept between RETRY_MIN_SECONDS and RETRY_MAX_SECONDS. Clients wait at least that long, plus a
jitter of their own so that refused clients do not all come back at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from kinema.errors import ResourceExhausted
from kinema.rpc.metrics import ServerMetrics

REASON = "SERVER_BUSY"
SETTING = "KINEMA_MAX_IN_FLIGHT"
RETRY_MIN_SECONDS = 0.1
RETRY_MAX_SECONDS = 30.0
_FIRST_MEAN_SECONDS = 1.0  # the mean duration assumed before any admitted call has finished
_SMOOTHING = 0.2  # weight of the latest call in the moving mean of durations


class Admission:
    """The places of one server; `place(...)` holds one for a call or raises ResourceExhausted when none is free.

    Only the server's event loop uses it (the interceptor), so a plain counter is enough.
    """

    def __init__(self, limit: int, metrics: ServerMetrics, server: str = "server") -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0 (0: no limit), got {limit}")
        self.limit, self.metrics, self.server = limit, metrics, server
        self.in_flight = 0
        self.mean_seconds = _FIRST_MEAN_SECONDS
        metrics.admission_limit.set(limit)

    def retry_after(self) -> float:
        """Seconds until a place is likely free again (while all are taken)."""
        seconds = self.mean_seconds / max(1, self.limit)
        return round(min(RETRY_MAX_SECONDS, max(RETRY_MIN_SECONDS, seconds)), 3)

    @contextlib.contextmanager
    def place(self, method: str) -> Iterator[None]:
        """Hold one place while the block runs; ResourceExhausted (with `retry_after`) when all are taken."""
        if self.limit and self.in_flight >= self.limit:
            wait = self.retry_after()
            raise ResourceExhausted(
                f"{self.server} is busy: all {self.limit} places for expensive calls are taken ({SETTING}); "
                f"{method} was not started. Retry in {wait:g} s or later; operators: raise {SETTING} or add replicas",
                reason=REASON,
                metadata={"limit": str(self.limit), "setting": SETTING},
                retry_after=wait,
            )
        self.in_flight += 1
        self.metrics.admission_in_flight.inc()
        started = time.monotonic()
        finished = False
        try:
            yield
            finished = True
        finally:
            self.in_flight -= 1
            self.metrics.admission_in_flight.dec()
            if finished:  # failures and cancels end early and say little about how long a call takes
                self.mean_seconds += _SMOOTHING * (time.monotonic() - started - self.mean_seconds)
