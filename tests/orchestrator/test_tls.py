"""TLS on real processes: the orchestrator's public endpoint over TLS (KINEMA_TLS_*), calling a model service that
requires client certificates (mTLS) with its internal certificate (KINEMA_INTERNAL_TLS_*), the CLI's --tls, and a
bad TLS file stopping a server at start in one line. The certificates are the `pki` fixture's (tests/conftest.py);
the model service is the autoencoder on the local backend over the shipped models (no Triton needed)."""

from __future__ import annotations

import grpc
import pytest

from kinema.autoencoder.v1 import autoencoder_pb2, autoencoder_pb2_grpc
from kinema.cli import main
from kinema.client import KinemaClient
from kinema.errors import Unavailable
from kinema.orchestration.capabilities import RemoteCapabilities
from kinema.repository import default_models_dir
from kinema.rpc.process import ServiceProcess, free_port
from kinema.rpc.settings import ServiceSettings
from kinema.rpc.tls import channel_credentials, internal_credentials


def _serving(pki) -> dict[str, str]:
    return {"KINEMA_TLS_CERT_FILE": str(pki.server.cert), "KINEMA_TLS_KEY_FILE": str(pki.server.key)}


def _internal(pki) -> dict[str, str]:
    return {"KINEMA_INTERNAL_TLS_CA_FILE": str(pki.ca), "KINEMA_INTERNAL_TLS_CERT_FILE": str(pki.client.cert),
            "KINEMA_INTERNAL_TLS_KEY_FILE": str(pki.client.key)}  # fmt: skip


@pytest.fixture(scope="module")
def secured(pki, tmp_path_factory: pytest.TempPathFactory):
    """(the autoencoder behind mTLS, the orchestrator behind TLS calling it); the other model services are down. The
    orchestrator's certificate names 127.0.0.1 and kinema.example.com, not localhost (for --tls-server-name)."""
    root = tmp_path_factory.mktemp("tls")
    public = pki.authority.issue("public", hosts=("127.0.0.1", "kinema.example.com"))
    mtls = ServiceProcess("autoencoder", root, credentials=channel_credentials(pki.ca, pki.client.cert, pki.client.key),
                          KINEMA_BACKEND="local", KINEMA_MODELS=str(default_models_dir()),
                          KINEMA_TLS_CLIENT_CA_FILE=str(pki.ca), **_serving(pki))  # fmt: skip
    down = {f"KINEMA_{n.upper()}_URL": f"127.0.0.1:{free_port()}" for n in ("text_encoder", "denoiser")}
    orchestrator = ServiceProcess("orchestrator", root, credentials=channel_credentials(pki.ca),
                                  KINEMA_ARTIFACTS=(root / "artifacts").as_uri(), KINEMA_AUTOENCODER_URL=mtls.address,
                                  KINEMA_TLS_CERT_FILE=str(public.cert), KINEMA_TLS_KEY_FILE=str(public.key),
                                  **down, **_internal(pki))  # fmt: skip
    orchestrator.down = sorted(down.values())
    try:
        mtls.launch()
        orchestrator.launch()
        yield mtls.wait_healthy(), orchestrator.wait_healthy()
    finally:
        orchestrator.stop()
        mtls.stop()


def _list_models(address: str, credentials: grpc.ChannelCredentials | None) -> list[str]:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = autoencoder_pb2_grpc.AutoencoderStub(channel)
        reply = stub.ListModels(autoencoder_pb2.ListModelsRequest(), timeout=10)
    return [m.name for m in reply.models]


def test_the_mtls_model_service_takes_only_clients_with_a_certificate_from_its_ca(secured, pki) -> None:
    service, _ = secured
    assert "vae_encoder" in _list_models(service.address, channel_credentials(pki.ca, pki.client.cert, pki.client.key))
    refused = [None, channel_credentials(pki.ca), channel_credentials(pki.ca, pki.stranger.cert, pki.stranger.key)]
    for credentials in refused:  # plaintext, no client certificate, one of another CA
        with pytest.raises(grpc.RpcError) as info:
            _list_models(service.address, credentials)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The orchestrator's clients of the services (RemoteCapabilities over open_channel) present the internal
    # certificate; without it the service is unavailable to them.
    internal = internal_credentials(ServiceSettings.from_env(_internal(pki)))
    for credentials, works in ((internal, True), (None, False)):
        capabilities = RemoteCapabilities({"autoencoder": service.address, "text_encoder": "127.0.0.1:1",
                                           "denoiser": "127.0.0.1:1"}, credentials)  # fmt: skip
        try:
            if works:
                assert capabilities.catalog("autoencoder", timeout=10).default_model == "vae"
            else:
                with pytest.raises(Unavailable):
                    capabilities.catalog("autoencoder", timeout=10)
        finally:
            capabilities.close()


def test_the_tls_orchestrator_answers_tls_clients_and_reaches_the_service_over_mtls(secured, pki) -> None:
    _, orchestrator = secured
    with KinemaClient(orchestrator.address, credentials=channel_credentials(pki.ca)) as kinema:
        (autoencoder,) = kinema.list_models("autoencoder", timeout=20)
        assert autoencoder.available and autoencoder.default_model == "vae"  # orchestrator -> service over mTLS
        assert {m.name for m in autoencoder.models} >= {"vae_encoder", "vae_decoder"}
        assert kinema.list_pipelines()
    with KinemaClient(orchestrator.address, timeout=10) as plaintext, pytest.raises(Unavailable) as info:
        plaintext.list_pipelines()
    assert info.value.reason == "SERVER_UNREACHABLE" and "speaks TLS" in str(info.value)


def test_the_cli_talks_to_a_tls_server_with_tls(secured, pki, tmp_path, capsys, monkeypatch) -> None:
    _, orchestrator = secured
    for name in ("KINEMA_TLS", "KINEMA_CA_CERT", "KINEMA_CLIENT_CERT", "KINEMA_CLIENT_KEY", "KINEMA_TLS_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    # As through a port-forward: the certificate does not name the host dialled, --tls-server-name says what it names.
    forwarded = ["--server", f"localhost:{orchestrator.port}", "jobs", "list", "--tls", "--ca-cert", str(pki.ca)]
    assert main(forwarded) == 3
    err = capsys.readouterr().err
    assert "cannot reach the Kinema server" in err and "TLS handshake failed" in err, err
    assert main([*forwarded, "--tls-server-name", "kinema.example.com"]) == 1  # UNIMPLEMENTED
    err = capsys.readouterr().err
    assert "durable jobs are off on this server" in err, err  # the server's own answer: the call went through
    address = f"127.0.0.1:{orchestrator.port}"
    # generate: --init-image is uploaded, then the run fails where the server calls a model service that is down.
    (tmp_path / "in.png").write_bytes(_png())
    monkeypatch.setenv("KINEMA_CA_CERT", str(pki.ca))  # as --ca-cert, which implies --tls
    argv = ["--server", address, "generate", "a cube", "--init-image", str(tmp_path / "in.png"), "-q",
            "-o", str(tmp_path / "out.png")]  # fmt: skip
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "cannot reach the Kinema server" not in err and any(a in err for a in orchestrator.down), err
    monkeypatch.delenv("KINEMA_CA_CERT")
    assert main(argv) == 3  # plaintext to a TLS server
    err = capsys.readouterr().err
    assert f"cannot reach the Kinema server at {address}" in err and "--tls" in err, err
    assert main([*argv, "--ca-cert", str(tmp_path / "nope.crt")]) == 2
    err = capsys.readouterr().err
    assert f"--ca-cert={tmp_path / 'nope.crt'}: cannot read it" in err and "Traceback" not in err, err


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def test_a_bad_tls_file_stops_the_server_at_start_in_one_line(pki, tmp_path) -> None:
    proc = ServiceProcess("orchestrator", tmp_path, KINEMA_ARTIFACTS=(tmp_path / "a").as_uri(),
                          KINEMA_TEXT_ENCODER_URL="127.0.0.1:1", KINEMA_DENOISER_URL="127.0.0.1:1",
                          KINEMA_AUTOENCODER_URL="127.0.0.1:1", **_serving(pki),
                          KINEMA_INTERNAL_TLS_CA_FILE=str(tmp_path / "missing-ca.crt"))  # fmt: skip
    proc.launch()
    assert proc.proc.wait(timeout=60) == 2
    log = proc.log.read_text()
    assert f"cannot start: KINEMA_INTERNAL_TLS_CA_FILE={tmp_path / 'missing-ca.crt'}: cannot read it" in log, log
    assert "Traceback" not in log
