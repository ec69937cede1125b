"""The async gRPC server every Kinema service runs: one interceptor for request ids, logs, metrics, admission
control (`kinema.rpc.admission`) and error mapping around every handler kind, plus standard health, reflection and
`/metrics`.

A service's `__main__` is `serve(build_server)` where `build_server(settings)` returns `make_server(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kinema.errors import DeadlineExceeded
from kinema.rpc.admission import Admission
from kinema.rpc.auth import ApiKeys
from kinema.rpc.logs import RequestContext, configure_logging, current_request, set_request
from kinema.rpc.metrics import MetricsEndpoint, ServerMetrics, serve_metrics
from kinema.rpc.settings import ServiceSettings
from kinema.rpc.status import to_status
from kinema.rpc.tls import server_credentials

_LOGGER = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# Probes and reflection run every few seconds: no per-request log line or metrics for them.
_PASS_THROUGH = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass
class Binding:
    """One gRPC service to host: its full name, the generated `add_<X>Servicer_to_server` and the servicer.

    `limited`: the methods that are expensive (a pipeline run, a network call); each call of one holds one of the
    server's `max_in_flight` places (kinema.rpc.admission). The others (listings, lookups) are never refused.
    """

    service: str  # e.g. "kinema.text_encoder.v1.TextEncoder"
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    limited: frozenset[str] = field(default_factory=frozenset)  # method names, e.g. {"Generate"}


def remaining_seconds(context: grpc.aio.ServicerContext, settings: ServiceSettings) -> float:
    """Seconds left for the current request: the client's deadline, else the server's request timeout.

    Pass it on as the timeout of downstream calls (Triton, other services) so they stop when the request must.
    """
    client = context.time_remaining()
    if client is not None:
        return max(0.0, client)
    request = current_request()
    elapsed = time.monotonic() - request.started if request else 0.0
    return max(0.0, settings.request_timeout_seconds - elapsed)


class _Rpc:
    """One call as the interceptor sees it: binds the request id, counts, times, maps errors, logs one line."""

    def __init__(self, interceptor: _Interceptor, service: str, method: str, context: grpc.aio.ServicerContext):
        self.interceptor, self.service, self.method, self.context = interceptor, service, method, context
        self.timeout: asyncio.Timeout | None = None
        self.request: RequestContext | None = None
        self.started = 0.0  # time.perf_counter() once the call is counted

    @property
    def budget(self) -> float | None:
        """The server-side time limit: only when the client set no deadline (gRPC enforces the client's)."""
        if self.context.time_remaining() is not None:
            return None
        return self.interceptor.settings.request_timeout_seconds

    async def __aenter__(self) -> _Rpc:
        rid = _request_id(self.context.invocation_metadata())
        self.request = RequestContext(rid, self.service, self.method, time.monotonic())
        set_request(self.request)  # each RPC runs in its own copy of the context: nothing to reset
        await self.context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
        self.interceptor.metrics.in_flight.labels(self.service, self.method).inc()
        self.started = time.perf_counter()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        assert self.request is not None
        if exc is None:
            self._finish(_code(self.context.code()) or grpc.StatusCode.OK)
        elif isinstance(exc, grpc.aio.AbortError):  # the servicer called context.abort itself
            self._finish(_code(self.context.code()) or grpc.StatusCode.UNKNOWN)
        elif isinstance(exc, asyncio.CancelledError):  # client gone or its deadline passed: nothing to send
            remaining = self.context.time_remaining()
            passed = remaining is not None and remaining <= 0
            self._finish(grpc.StatusCode.DEADLINE_EXCEEDED if passed else grpc.StatusCode.CANCELLED)
        elif isinstance(exc, Exception):
            if isinstance(exc, TimeoutError) and self.timeout is not None and self.timeout.expired():
                limit = self.interceptor.settings.request_timeout_seconds
                exc = DeadlineExceeded(
                    f"request exceeded the server limit of {limit:g} s; set a client deadline or raise "
                    "KINEMA_REQUEST_TIMEOUT_SECONDS",
                    reason="SERVER_TIMEOUT",
                )
            status = to_status(exc, self.request.request_id)
            if status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and getattr(exc, "retry_after", None) is not None:
                reason = getattr(exc, "reason", "") or status.code.name  # refused for load, here or downstream
                self.interceptor.metrics.rejected.labels(self.service, self.method, reason).inc()
            self._finish(status.code, exc)
            await self.context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
        else:
            self._finish(grpc.StatusCode.UNKNOWN, exc)
        return False

    def _finish(self, code: grpc.StatusCode, exc: BaseException | None = None) -> None:
        seconds = time.perf_counter() - self.started
        metrics = self.interceptor.metrics
        metrics.in_flight.labels(self.service, self.method).dec()
        metrics.requests.labels(self.service, self.method, code.name).inc()
        metrics.request_seconds.labels(self.service, self.method, code.name).observe(seconds)
        extra: dict[str, object] = {"code": code.name, "duration_ms": round(seconds * 1e3, 3)}
        extra["peer"] = self.context.peer()
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            # The traceback of an unexpected error goes to the server log only; the client gets a request id.
            _LOGGER.error("rpc failed", exc_info=exc, extra=extra)
            return
        if exc is not None:
            extra.update(error=str(exc), reason=getattr(exc, "reason", ""), field=getattr(exc, "field", ""))
        _LOGGER.log(logging.INFO if code == grpc.StatusCode.OK else logging.WARNING, "rpc finished", extra=extra)


class _Interceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler kind so servicers only `raise InvalidInput(...)` and return or yield responses.

    All four wrappers are coroutine functions: a servicer's async-generator response stream is drained here
    with `context.write`, so the whole call (and its error handling) runs in the call's own task.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServerMetrics,
        keys: ApiKeys | None = None,
        admission: Admission | None = None,
        limited: frozenset[tuple[str, str]] = frozenset(),
    ):
        self.settings, self.metrics, self.keys = settings, metrics, keys
        self.admission, self.limited = admission, limited  # limited: (service, method) pairs that take a place

    def _place(self, service: str, method: str) -> contextlib.AbstractContextManager:
        if self.admission is None or (service, method) not in self.limited:
            return contextlib.nullcontext()
        return self.admission.place(method)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if handler is None or service in _PASS_THROUGH:
            return handler
        codec = {"request_deserializer": handler.request_deserializer}
        codec["response_serializer"] = handler.response_serializer
        if handler.response_streaming:
            if handler.request_streaming:
                return grpc.stream_stream_rpc_method_handler(
                    self._stream_response(handler.stream_stream, service, method), **codec
                )
            return grpc.unary_stream_rpc_method_handler(
                self._stream_response(handler.unary_stream, service, method), **codec
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(handler.stream_unary, service, method), **codec
            )
        return grpc.unary_unary_rpc_method_handler(self._unary_response(handler.unary_unary, service, method), **codec)

    def _unary_response(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Rpc(self, service, method, context) as rpc, asyncio.timeout(rpc.budget) as rpc.timeout:
                if self.keys is not None:
                    self.keys.authenticate(context.invocation_metadata())
                with self._place(service, method):
                    result = behavior(request, context)
                    if not inspect.isawaitable(result):
                        raise TypeError(f"{service}/{method} must be an `async def` servicer method")
                    return await result

        return handle

    def _stream_response(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> None:
            async with _Rpc(self, service, method, context) as rpc, asyncio.timeout(rpc.budget) as rpc.timeout:
                if self.keys is not None:
                    self.keys.authenticate(context.invocation_metadata())
                with self._place(service, method):  # held until the stream ends
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        try:
                            async for response in result:
                                await context.write(response)
                        finally:
                            await result.aclose()
                    elif inspect.isawaitable(result):  # writer style: the servicer calls context.write itself
                        await result
                    else:
                        raise TypeError(f"{service}/{method} must be an `async def` servicer method or async generator")

        return handle


class KinemaServer:
    """A Kinema gRPC server: the bound services, health, reflection and (optionally) `/metrics`."""

    def __init__(
        self, settings: ServiceSettings, bindings: Sequence[Binding], name: str, metrics: ServerMetrics | None = None
    ):
        self.settings, self.name = settings, name
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.services = tuple(b.service for b in bindings)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._endpoint: MetricsEndpoint | None = None
        self._stopped = False
        # A bad keys file stops the server from starting rather than leaving it open; so does a bad TLS file.
        self.keys = ApiKeys.load(settings.api_keys_file) if settings.api_keys_file else None
        self._credentials = server_credentials(settings)  # None: plaintext
        self.health_port: int | None = None
        self.admission = Admission(settings.max_in_flight, self.metrics, name)
        self.limited = frozenset((b.service, m) for b in bindings for m in b.limited)  # (service, method) pairs
        self._server = grpc.aio.server(
            interceptors=(_Interceptor(settings, self.metrics, self.keys, self.admission, self.limited),),
            options=(
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Linux gRPC defaults to SO_REUSEPORT: a second server would silently share a taken port.
                ("grpc.so_reuseport", 0),
            ),
        )
        for binding in bindings:
            binding.add_to_server(binding.servicer, self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        # Probes that cannot speak TLS (Kubernetes' grpc probe) ask a plaintext server that hosts health alone, the
        # same servicer: it can tell SERVING from NOT_SERVING and nothing else.
        self._health_server: grpc.aio.Server | None = None
        if settings.health_port:
            self._health_server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)

    async def start(self) -> None:
        """Bind host:port (`.port` holds the bound port, also for port 0), start serving, mark health SERVING."""
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        address = f"{host}:{self.settings.port}"
        try:
            if self._credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, self._credentials)
            if self._health_server is not None:
                address = f"{host}:{self.settings.health_port}"
                self.health_port = self._health_server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"{self.name}: cannot bind {address}: {exc}") from exc
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        for service in ("", *self.services):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.metrics_port:
            self._endpoint = serve_metrics(self.metrics.registry, self.settings.host, self.settings.metrics_port)
            self.metrics_port = self._endpoint.port
        extra = {"server": self.name, "address": f"{host}:{self.port}", "metrics_port": self.metrics_port,
                 "tls": self.tls, "health_port": self.health_port}  # fmt: skip
        _LOGGER.info("serving", extra=extra | {"services": list(self.services)})

    @property
    def tls(self) -> str:
        """How the serving port is secured: "off", "tls" or "mtls" (client certificates required)."""
        if self._credentials is None:
            return "off"
        return "mtls" if self.settings.tls_client_ca_file else "tls"

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let running ones finish within `grace` s, stop `/metrics`."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_seconds if grace is None else grace
        _LOGGER.info("stopping", extra={"server": self.name, "grace_seconds": grace})
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._endpoint is not None:
            self._endpoint.stop()
            self._endpoint = None

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def make_server(
    settings: ServiceSettings, bindings: Sequence[Binding], name: str, metrics: ServerMetrics | None = None
) -> KinemaServer:
    """A not yet started server; create it inside the event loop that will run it.

    Pass `metrics` when servicers or model runners built before the server record into it.
    """
    return KinemaServer(settings, bindings, name, metrics)


async def run_until_signal(build_server: Callable[[ServiceSettings], Any], settings: ServiceSettings) -> None:
    """Build (sync or async `build_server`), start, serve until SIGINT/SIGTERM or termination, stop gracefully.

    Raises CannotStart for a settings error (ValueError, InvalidInput among them) or an OSError (a file, a port) met
    while building or starting the server.
    """
    try:
        server = build_server(settings)
        if inspect.isawaitable(server):
            server = await server
        await server.start()
    except (ValueError, OSError) as e:
        raise CannotStart(str(e)) from e
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(server.wait_for_termination())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop()
        for task in waits:
            task.cancel()


class CannotStart(Exception):
    """The server did not start: a setting, or a file one names (API keys, TLS), is wrong, or its port is taken."""


def serve(build_server: Callable[[ServiceSettings], Any], settings: ServiceSettings | None = None) -> None:
    """A service's `__main__`: settings from the environment, JSON logs, serve until SIGINT/SIGTERM.

    A server that cannot start logs one line saying why (`cannot start`) and exits with status 2, no traceback.
    """
    try:
        settings = settings if settings is not None else ServiceSettings.from_env()
    except ValueError as e:
        configure_logging()
        _LOGGER.error("cannot start: %s", e)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    try:
        asyncio.run(run_until_signal(build_server, settings))
    except CannotStart as e:
        _LOGGER.error("cannot start: %s", e)
        _LOGGER.debug("why it cannot start", exc_info=e.__cause__)
        raise SystemExit(2) from None


def _request_id(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The client's `x-request-id` when it is a sane token, else a fresh one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _code(code: object) -> grpc.StatusCode | None:
    """A context's status code as a StatusCode (aio contexts hold an enum or, after abort, may hold an int)."""
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), None)
