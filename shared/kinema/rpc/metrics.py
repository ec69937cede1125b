"""Prometheus metrics of one server process, in its own registry, and the `/metrics` HTTP endpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# RPCs range from sub-millisecond health checks to minutes-long video sampling.
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MODEL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The metric families every Kinema service exports; one instance (and registry) per server.

    Servicers and model runners get the instance from the service's `build_server` and time each network
    evaluation with `time_model(model, backend)`.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kinema_rpc_requests",
            "RPCs finished, by status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "kinema_rpc_request_seconds",
            "RPC wall time from handler start to status.",
            ["service", "method", "code"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "kinema_rpc_in_flight_requests", "RPCs being handled now.", ["service", "method"], registry=self.registry
        )
        # Admission control (kinema.rpc.admission): the places expensive calls hold, and the calls refused for load.
        self.admission_in_flight = Gauge(
            "kinema_admission_in_flight", "Expensive RPCs holding one of the KINEMA_MAX_IN_FLIGHT places now.",
            registry=self.registry,
        )  # fmt: skip
        self.admission_limit = Gauge(
            "kinema_admission_limit", "KINEMA_MAX_IN_FLIGHT of this process (0: no limit).", registry=self.registry
        )
        self.rejected = Counter(
            "kinema_rpc_rejected",
            "RPCs refused for load (RESOURCE_EXHAUSTED with a retry hint), by reason: SERVER_BUSY (all "
            "KINEMA_MAX_IN_FLIGHT places taken), JOB_QUEUE_FULL (KINEMA_MAX_QUEUED_JOBS), or a busy service it calls.",
            ["service", "method", "reason"],
            registry=self.registry,
        )
        self.model_seconds = Histogram(
            "kinema_model_seconds",
            "Wall time of one network evaluation.",
            ["model", "backend"],
            buckets=MODEL_BUCKETS,
            registry=self.registry,
        )
        self.model_errors = Counter(
            "kinema_model_errors", "Failed network evaluations, by reason.", ["model", "reason"], registry=self.registry
        )

    @contextmanager
    def time_model(self, model: str, backend: str) -> Iterator[None]:
        """Observe one network evaluation; a failure counts in `kinema_model_errors_total` and propagates."""
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.model_errors.labels(model, getattr(exc, "reason", "") or type(exc).__name__).inc()
            raise
        finally:
            self.model_seconds.labels(model, backend).observe(time.perf_counter() - start)


@dataclass
class MetricsEndpoint:
    """A running `/metrics` HTTP server (prometheus_client's WSGI server on a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def stop(self, timeout: float = 5.0) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve `registry` over HTTP on host:port (0: any free port, see `.port`) until `.stop()`."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread)
