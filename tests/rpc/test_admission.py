"""Admission control over real gRPC on loopback: a test-only service behind the Kinema server with
KINEMA_MAX_IN_FLIGHT 1; a held stream takes the one place, and what comes next is refused or answered."""

import asyncio
import importlib
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kinema.errors import ResourceExhausted
from kinema.rpc.admission import RETRY_MAX_SECONDS, RETRY_MIN_SECONDS, Admission
from kinema.rpc.metrics import ServerMetrics
from kinema.rpc.server import Binding, KinemaServer, make_server
from kinema.rpc.settings import ServiceSettings
from kinema.rpc.status import RETRY_AFTER_KEY, STATUS_DETAILS_KEY, from_rpc_error, parse_error_detail

SERVICE = "kinema.test.v1.Gate"


class Gate:
    """`Hold` streams "started", waits until the test opens the gate, then "done"; `Work` answers at once; both
    are limited. `Peek` (not limited) answers how many places are taken."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.server: KinemaServer | None = None

    async def Hold(self, request: bytes, context: grpc.aio.ServicerContext):
        yield b"started"
        await self.gate.wait()
        yield b"done"

    async def Work(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"worked"

    async def Peek(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return str(self.server.admission.in_flight).encode()


def _add_gate(servicer: Gate, server: grpc.aio.Server) -> None:
    handlers = {
        "Hold": grpc.unary_stream_rpc_method_handler(servicer.Hold),
        "Work": grpc.unary_unary_rpc_method_handler(servicer.Work),
        "Peek": grpc.unary_unary_rpc_method_handler(servicer.Peek),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


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
def gate(loop, tmp_path_factory) -> Iterator[tuple[KinemaServer, Gate]]:
    settings = ServiceSettings(port=0, metrics_port=0, models_dir=tmp_path_factory.mktemp("models"), max_in_flight=1)
    servicer = Gate()

    async def build() -> KinemaServer:
        binding = Binding(SERVICE, _add_gate, servicer, limited=frozenset({"Hold", "Work"}))
        server = make_server(settings, [binding], "gate")
        await server.start()
        return server

    server = _on(loop, build())
    servicer.server = server
    yield server, servicer
    _on(loop, server.stop(0))


def _fail(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _samples(server: KinemaServer) -> dict[tuple[str, tuple], float]:
    from prometheus_client import generate_latest

    text = generate_latest(server.metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


def test_a_second_expensive_call_is_refused_with_a_hint_while_cheap_calls_answer(gate, loop) -> None:
    server, servicer = gate
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        hold, work = channel.unary_stream(f"/{SERVICE}/Hold"), channel.unary_unary(f"/{SERVICE}/Work")
        peek = channel.unary_unary(f"/{SERVICE}/Peek")
        first = hold(b"", timeout=30)
        assert next(first) == b"started"  # the first call holds the one place now

        refused = _fail(lambda: list(hold(b"", timeout=10)))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KINEMA_MAX_IN_FLIGHT" in refused.details() and "Retry in" in refused.details()
        trailers = dict(refused.trailing_metadata())
        assert int(trailers[RETRY_AFTER_KEY]) >= RETRY_MIN_SECONDS * 1000 and STATUS_DETAILS_KEY in trailers
        assert parse_error_detail(refused.trailing_metadata()).reason == "SERVER_BUSY"
        error = from_rpc_error(refused)
        assert isinstance(error, ResourceExhausted)
        assert RETRY_MIN_SECONDS <= error.retry_after <= RETRY_MAX_SECONDS
        assert _fail(lambda: work(b"", timeout=10)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # unary too

        # Cheap calls are never refused: an unlimited method and health.
        assert peek(b"", timeout=10) == b"1"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        loop.call_soon_threadsafe(servicer.gate.set)
        assert list(first) == [b"done"]  # the first call was never disturbed
        assert peek(b"", timeout=10) == b"0"
        assert work(b"", timeout=10) == b"worked"  # the place is free again

    samples = _samples(server)
    rejected = [(labels, value) for (name, labels), value in samples.items() if name == "kinema_rpc_rejected_total"]
    assert sorted(rejected) == [
        ((("method", "Hold"), ("reason", "SERVER_BUSY"), ("service", SERVICE)), 1.0),
        ((("method", "Work"), ("reason", "SERVER_BUSY"), ("service", SERVICE)), 1.0),
    ]
    assert samples[("kinema_admission_in_flight", ())] == 0
    assert samples[("kinema_admission_limit", ())] == 1
    hold_refused = (("code", "RESOURCE_EXHAUSTED"), ("method", "Hold"), ("service", SERVICE))
    assert samples[("kinema_rpc_requests_total", hold_refused)] == 1


def test_the_metrics_endpoint_serves_the_admission_families(loop, tmp_path) -> None:
    settings = ServiceSettings(port=0, metrics_port=_free_port(), models_dir=tmp_path, max_in_flight=3)

    async def build() -> KinemaServer:
        server = make_server(settings, [], "empty")
        await server.start()
        return server

    server = _on(loop, build())
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    finally:
        _on(loop, server.stop(0))
    assert "kinema_admission_limit 3.0" in text and "kinema_admission_in_flight 0.0" in text
    assert "# TYPE kinema_rpc_rejected_total counter" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_admission_counts_places_and_hints_within_bounds(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("kinema.rpc.admission.time.monotonic", lambda: clock[0])
    admission = Admission(2, ServerMetrics(), "svc")
    with admission.place("A"), admission.place("B"):
        assert admission.in_flight == 2
        with pytest.raises(ResourceExhausted) as info, admission.place("C"):
            pass
        message = str(info.value)
        assert info.value.reason == "SERVER_BUSY" and "svc is busy" in message and "C was not" in message
        clock[0] += 40.0  # both calls take 40 s
    assert admission.in_flight == 0
    assert admission.mean_seconds > 1.0  # moved towards 40 s: a longer hint
    assert RETRY_MIN_SECONDS < admission.retry_after() <= RETRY_MAX_SECONDS
    with pytest.raises(RuntimeError), admission.place("D"):
        raise RuntimeError("a failed call")
    assert admission.in_flight == 0  # a failure gives its place back
    unlimited = Admission(0, ServerMetrics())
    with unlimited.place("A"), unlimited.place("B"), unlimited.place("C"):
        assert unlimited.in_flight == 3


def test_max_in_flight_setting_from_env(tmp_path) -> None:
    assert ServiceSettings(models_dir=tmp_path).max_in_flight == 32
    assert ServiceSettings.from_env({"KINEMA_MAX_IN_FLIGHT": "0", "KINEMA_MODELS": str(tmp_path)}).max_in_flight == 0
    for raw in ("-1", "many", "1.5"):
        with pytest.raises(ValueError, match="KINEMA_MAX_IN_FLIGHT"):
            ServiceSettings.from_env({"KINEMA_MAX_IN_FLIGHT": raw, "KINEMA_MODELS": str(tmp_path)})


@pytest.mark.parametrize("name", ["text_encoder", "autoencoder", "denoiser", "distill", "depth", "interpret"])
def test_model_services_limit_every_rpc_but_list_models(name: str, tmp_path) -> None:
    module = importlib.import_module(f"services.{name}.server")
    settings = ServiceSettings(port=0, backend="local", models_dir=tmp_path)

    async def build() -> KinemaServer:
        server = module.build_server(settings)
        return await server if asyncio.iscoroutine(server) else server

    server = asyncio.run(build())
    (service,) = server.services
    methods = {m for _, m in server.limited}
    assert methods and "ListModels" not in methods and {s for s, _ in server.limited} == {service}
