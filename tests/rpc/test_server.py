"""Real gRPC over loopback: a test-only raw-bytes service behind the Kinema server, driven by a sync client.

The server's event loop runs on a background thread, so the blocking client never stalls it.
"""

import asyncio
import io
import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kinema.common.v1 import common_pb2
from kinema.errors import DeadlineExceeded, InvalidInput, KinemaError, NotFound, ResourceExhausted, Unavailable
from kinema.rpc.logs import JsonFormatter, configure_logging, request_id
from kinema.rpc.metrics import ServerMetrics
from kinema.rpc.server import Binding, KinemaServer, make_server, remaining_seconds
from kinema.rpc.settings import ServiceSettings
from kinema.rpc.status import ERROR_DETAIL_KEY, parse_error_detail, to_status

SERVICE = "kinema.test.v1.Echo"
SLOW_SECONDS = 0.5


class Echo:
    """Test-only servicer over raw bytes; every method is async, as Kinema servicers are."""

    def __init__(self, metrics: ServerMetrics, settings: ServiceSettings):
        self.metrics, self.settings = metrics, settings

    async def Say(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with self.metrics.time_model("echo", "local"):
            if request == b"bad":
                raise InvalidInput("payload: must not be 'bad'", reason="BAD_PAYLOAD", field="payload")
            if request == b"missing":
                raise NotFound("no such echo")
            if request == b"full":
                raise ResourceExhausted("batch too large")
            if request == b"boom":
                raise RuntimeError("secret detail")
            if request == b"slow":
                await asyncio.sleep(SLOW_SECONDS)
            if request == b"abort":
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "servicer said no")
            if request == b"whoami":
                return request_id().encode()
            if request == b"budget":
                return f"{remaining_seconds(context, self.settings):.3f}".encode()
            return request

    async def Count(self, request: bytes, context: grpc.aio.ServicerContext):
        n, fail, _ = request.partition(b"!")
        for i in range(int(n)):
            yield str(i).encode()
        if fail:
            raise InvalidInput("count: failed after streaming", reason="LATE", field="count")

    async def Sum(self, requests, context: grpc.aio.ServicerContext) -> bytes:
        total = 0
        async for r in requests:
            if r == b"x":
                raise InvalidInput("values: not a number", field="values")
            total += int(r)
        return str(total).encode()

    async def Shout(self, requests, context: grpc.aio.ServicerContext) -> None:
        async for r in requests:  # writer style instead of an async generator: the interceptor supports both
            await context.write(r.upper())


def _add_echo(servicer: Echo, server: grpc.aio.Server) -> None:
    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(servicer.Say),
        "Count": grpc.unary_stream_rpc_method_handler(servicer.Count),
        "Sum": grpc.stream_unary_rpc_method_handler(servicer.Sum),
        "Shout": grpc.stream_stream_rpc_method_handler(servicer.Shout),
    }
    # As generated `add_<X>Servicer_to_server` does: registered handlers take precedence over generic ones.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _on(loop: asyncio.AbstractEventLoop, coro, timeout: float = 10.0):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@pytest.fixture(scope="module")
def start(loop, tmp_path_factory) -> Iterator[Callable[..., KinemaServer]]:
    servers: list[KinemaServer] = []
    models = tmp_path_factory.mktemp("models")

    def start(**overrides) -> KinemaServer:
        settings = ServiceSettings(**{"port": 0, "models_dir": models, "max_message_bytes": 64 * 1024} | overrides)

        async def build() -> KinemaServer:
            metrics = ServerMetrics()
            server = make_server(settings, [Binding(SERVICE, _add_echo, Echo(metrics, settings))], "echo", metrics)
            await server.start()
            return server

        servers.append(_on(loop, build()))
        return servers[-1]

    yield start
    for server in servers:
        _on(loop, server.stop(0))


@pytest.fixture(scope="module")
def server(start) -> KinemaServer:
    return start(metrics_port=_free_port(), request_timeout_seconds=0.3)


@pytest.fixture(scope="module")
def channel(server: KinemaServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def _say(channel: grpc.Channel):
    return channel.unary_unary(f"/{SERVICE}/Say")


def _fail(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_binds_port_zero_and_echoes(server: KinemaServer, channel: grpc.Channel) -> None:
    assert server.port and server.port > 0
    assert _say(channel)(b"hello", timeout=5) == b"hello"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"bad", grpc.StatusCode.INVALID_ARGUMENT),
        (b"missing", grpc.StatusCode.NOT_FOUND),
        (b"full", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (b"boom", grpc.StatusCode.INTERNAL),
        (b"abort", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_domain_errors_map_to_codes_and_server_keeps_serving(channel, payload: bytes, code) -> None:
    err = _fail(lambda: _say(channel)(payload, timeout=5))
    assert err.code() == code
    assert _say(channel)(b"still here", timeout=5) == b"still here"


def test_invalid_input_carries_message_and_error_detail(channel: grpc.Channel) -> None:
    err = _fail(lambda: _say(channel)(b"bad", timeout=5, metadata=(("x-request-id", "req-1"),)))
    assert err.details() == "payload: must not be 'bad'"
    detail = parse_error_detail(err.trailing_metadata())
    assert isinstance(detail, common_pb2.ErrorDetail)
    assert (detail.reason, detail.field, detail.metadata["request_id"]) == ("BAD_PAYLOAD", "payload", "req-1")


def test_no_error_detail_without_reason_or_field(channel: grpc.Channel) -> None:
    err = _fail(lambda: _say(channel)(b"missing", timeout=5))
    assert err.details() == "no such echo"
    assert parse_error_detail(err.trailing_metadata()) is None


def test_internal_error_hides_details_but_logs_them(channel: grpc.Channel) -> None:
    log = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("INFO", stream=log)
    try:
        err = _fail(lambda: _say(channel)(b"boom", timeout=5, metadata=(("x-request-id", "req-boom"),)))
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert err.details() == "internal error (request id req-boom)"
    assert "secret detail" not in err.details() and "Traceback" not in err.details()
    assert all(key != ERROR_DETAIL_KEY for key, _ in err.trailing_metadata())
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    line = next(entry for entry in lines if entry["request_id"] == "req-boom")
    assert (line["service"], line["method"], line["code"], line["level"]) == (SERVICE, "Say", "INTERNAL", "ERROR")
    assert "secret detail" in line["exc"] and "Traceback" in line["exc"]


def test_request_id_is_echoed_bound_and_generated(channel: grpc.Channel) -> None:
    response, call = _say(channel).with_call(b"whoami", timeout=5, metadata=(("x-request-id", "abc-123"),))
    assert response == b"abc-123"
    assert ("x-request-id", "abc-123") in call.initial_metadata()
    for unfit in ("has space", "x" * 129):
        response, call = _say(channel).with_call(b"whoami", timeout=5, metadata=(("x-request-id", unfit),))
        assert dict(call.initial_metadata())["x-request-id"] == response.decode() != unfit
    err = _fail(lambda: _say(channel)(b"bad", timeout=5, metadata=(("x-request-id", "on-error"),)))
    assert ("x-request-id", "on-error") in err.initial_metadata()


def test_client_deadline_is_deadline_exceeded(channel: grpc.Channel) -> None:
    err = _fail(lambda: _say(channel)(b"slow", timeout=0.1))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_server_timeout_bounds_calls_without_a_client_deadline(channel: grpc.Channel) -> None:
    budget = float(_say(channel)(b"budget"))
    assert 0.0 < budget <= 0.3
    assert 4.0 < float(_say(channel)(b"budget", timeout=5)) <= 5.1  # the client's deadline, not the server's
    err = _fail(lambda: _say(channel)(b"slow"))  # sleeps 0.5 s, server limit 0.3 s
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert parse_error_detail(err.trailing_metadata()).reason == "SERVER_TIMEOUT"


def test_unary_stream_streams_and_maps_late_errors(channel: grpc.Channel) -> None:
    count = channel.unary_stream(f"/{SERVICE}/Count")
    assert list(count(b"3", timeout=5)) == [b"0", b"1", b"2"]
    call = count(b"2!", timeout=5)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        got.extend(call)
    assert got == [b"0", b"1"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert parse_error_detail(info.value.trailing_metadata()).field == "count"


def test_stream_unary_and_stream_stream(channel: grpc.Channel) -> None:
    total = channel.stream_unary(f"/{SERVICE}/Sum")
    assert total(iter([b"1", b"2", b"39"]), timeout=5) == b"42"
    assert _fail(lambda: total(iter([b"1", b"x"]), timeout=5)).code() == grpc.StatusCode.INVALID_ARGUMENT
    shout = channel.stream_stream(f"/{SERVICE}/Shout")
    assert list(shout(iter([b"a", b"bc"]), timeout=5)) == [b"A", b"BC"]


def test_message_larger_than_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    err = _fail(lambda: _say(channel)(b"x" * (65 * 1024), timeout=5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_serving_for_server_and_each_service(server: KinemaServer, channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
    err = _fail(lambda: stub.Check(health_pb2.HealthCheckRequest(service="kinema.nope.v1.Nope"), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_every_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for s in response.list_services_response.service}
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def test_metrics_endpoint_serves_families_with_labels(server: KinemaServer, channel: grpc.Channel) -> None:
    _say(channel)(b"hi", timeout=5)
    _fail(lambda: _say(channel)(b"bad", timeout=5))
    _fail(lambda: _say(channel)(b"boom", timeout=5))
    list(channel.unary_stream(f"/{SERVICE}/Count")(b"1", timeout=5))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    rpc = {"service": SERVICE, "method": "Say"}
    assert value("kinema_rpc_requests_total", **rpc, code="OK") >= 1
    assert value("kinema_rpc_requests_total", **rpc, code="INVALID_ARGUMENT") >= 1
    assert value("kinema_rpc_requests_total", **rpc, code="INTERNAL") >= 1
    assert value("kinema_rpc_requests_total", service=SERVICE, method="Count", code="OK") >= 1
    assert value("kinema_rpc_request_seconds_count", **rpc, code="OK") >= 1
    assert value("kinema_rpc_request_seconds_bucket", **rpc, code="OK", le="+Inf") >= 1
    assert value("kinema_rpc_in_flight_requests", **rpc) == 0
    assert value("kinema_model_seconds_count", model="echo", backend="local") >= 3
    assert value("kinema_model_errors_total", model="echo", reason="RuntimeError") >= 1
    assert value("kinema_model_errors_total", model="echo", reason="BAD_PAYLOAD") >= 1
    assert not any(name.startswith("kinema_rpc") and "grpc.health" in str(labels) for name, labels in samples)


def test_stop_drains_running_calls_and_reports_not_serving(loop, start) -> None:
    server = start(grace_seconds=1.0)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        slow = _say(ch).future(b"slow", timeout=5)
        time.sleep(0.1)
        stopping = asyncio.run_coroutine_threadsafe(server.stop(), loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert slow.result() == b"slow"  # began before stop: allowed to finish
        stopping.result(5)
        assert _fail(lambda: _say(ch)(b"late", timeout=1)).code() == grpc.StatusCode.UNAVAILABLE


def test_to_status_maps_every_domain_error() -> None:
    cases = {
        InvalidInput("x"): grpc.StatusCode.INVALID_ARGUMENT,
        NotFound("x"): grpc.StatusCode.NOT_FOUND,
        Unavailable("x"): grpc.StatusCode.UNAVAILABLE,
        ResourceExhausted("x"): grpc.StatusCode.RESOURCE_EXHAUSTED,
        DeadlineExceeded("x"): grpc.StatusCode.DEADLINE_EXCEEDED,
        KinemaError("x"): grpc.StatusCode.INTERNAL,
        ValueError("x"): grpc.StatusCode.INTERNAL,
        asyncio.CancelledError(): grpc.StatusCode.CANCELLED,
    }
    for exc, code in cases.items():
        assert to_status(exc, "r").code == code, exc


def test_settings_from_env_and_errors_name_the_variable(tmp_path: Path) -> None:
    env = {"KINEMA_PORT": "0", "KINEMA_BACKEND": "local", "KINEMA_MODELS": str(tmp_path), "KINEMA_LOG_LEVEL": "debug"}
    s = ServiceSettings.from_env(env, max_batch=4)
    assert (s.port, s.backend, s.models_dir, s.log_level, s.max_batch) == (0, "local", tmp_path, "DEBUG", 4)
    assert s.max_message_bytes == 64 * 1024 * 1024 and s.request_timeout_seconds == 300.0
    assert s.max_prompt_chars == 2000
    assert ServiceSettings.from_env(env | {"KINEMA_MAX_PROMPT_CHARS": "80"}).max_prompt_chars == 80
    for var, raw in [
        ("KINEMA_PORT", "http"),
        ("KINEMA_PORT", "70000"),
        ("KINEMA_BACKEND", "onnx"),
        ("KINEMA_MAX_BATCH", "0"),
        ("KINEMA_GRACE_SECONDS", "nan"),
        ("KINEMA_LOG_LEVEL", "loud"),
        ("KINEMA_MAX_PROMPT_CHARS", "0"),
        ("KINEMA_MAX_PROMPT_CHARS", "-1"),
        ("KINEMA_MAX_PROMPT_CHARS", "2k"),
    ]:
        with pytest.raises(ValueError, match=var):
            ServiceSettings.from_env({"KINEMA_MODELS": str(tmp_path), var: raw})
    with pytest.raises(ValueError, match="metrics_port"):
        ServiceSettings(metrics_port=-1, models_dir=tmp_path)


def test_json_formatter_adds_extra_fields() -> None:
    record = logging.LogRecord("kinema.x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    record.steps = 4
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello there" and entry["steps"] == 4 and entry["request_id"] is None
    assert set(entry) >= {"ts", "level", "logger", "message", "request_id", "service", "method"}
