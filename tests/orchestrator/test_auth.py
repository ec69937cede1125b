"""API keys on a real orchestrator process (KINEMA_API_KEYS_FILE): no key or an unknown one is UNAUTHENTICATED,
a key acting for another tenant PERMISSION_DENIED, a key's tenant owns what it stores; probes need no key."""

from __future__ import annotations

import io
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from kinema.client import KinemaClient
from kinema.errors import NotFound, Unauthenticated
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from kinema.rpc.auth import key_hash, new_key
from kinema.rpc.process import ServiceProcess, free_port
from kinema.rpc.status import parse_error_detail

ACME, BOB = new_key(), new_key()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory):
    """An orchestrator with a keys file for tenants acme and bob (no model services: none is called here)."""
    root = tmp_path_factory.mktemp("auth")
    keys = root / "keys.txt"
    keys.write_text(f"# tenant sha256\nacme {key_hash(ACME)}\nbob {key_hash(BOB)}\n")
    addresses = {f"KINEMA_{name.upper()}_URL": f"127.0.0.1:{free_port()}" for name in ("text_encoder", "denoiser",
                                                                                      "autoencoder")}  # fmt: skip
    proc = ServiceProcess("orchestrator", root, KINEMA_ARTIFACTS=(root / "artifacts").as_uri(),
                          KINEMA_API_KEYS_FILE=str(keys), **addresses).start()  # fmt: skip
    try:
        yield proc
    finally:
        proc.stop()


def metadata(key: str | None = None, tenant: str | None = None) -> tuple[tuple[str, str], ...]:
    return ((("authorization", f"Bearer {key}"),) if key else ()) + ((("kinema-tenant", tenant),) if tenant else ())


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def test_calls_need_a_key_of_the_tenant_they_act_for(guarded) -> None:
    with guarded.channel() as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # probes carry no key
        cases = [
            (metadata(), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING"),
            (metadata(tenant="acme"), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING"),
            (metadata("kin_wrong"), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID"),
            (metadata(ACME, "bob"), grpc.StatusCode.PERMISSION_DENIED, "TENANT_MISMATCH"),
        ]
        for md, code, reason in cases:
            for call in (lambda md=md: stub.ListPipelines(pb.ListPipelinesRequest(), metadata=md, timeout=10),
                         lambda md=md: stub.GetJob(pb.GetJobRequest(id="0" * 32), metadata=md, timeout=10),
                         lambda md=md: list(stub.WatchJob(pb.WatchJobRequest(id="0" * 32), metadata=md, timeout=10)),
                         lambda md=md: stub.UploadArtifact(iter([]), metadata=md, timeout=10)):  # fmt: skip
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == code and parse_error_detail(info.value.trailing_metadata()).reason == reason
                assert ACME not in info.value.details() and "Traceback" not in info.value.details()
        assert stub.ListPipelines(pb.ListPipelinesRequest(), metadata=metadata(ACME), timeout=10).pipelines
        assert stub.ListPipelines(pb.ListPipelinesRequest(), metadata=metadata(ACME, "acme"), timeout=10).pipelines


def test_what_a_key_stores_belongs_to_its_tenant(guarded) -> None:
    with KinemaClient(guarded.address, api_key=ACME) as acme, KinemaClient(guarded.address, api_key=BOB) as bob:
        ref = acme.upload(png(), filename="green.png")
        assert "/acme/" in ref.uri and acme.get_artifact(ref.sha256).provenance.pipeline == "upload"
        with pytest.raises(NotFound):
            bob.get_artifact(ref.sha256)
    with KinemaClient(guarded.address, tenant="acme") as keyless, pytest.raises(Unauthenticated):
        keyless.list_pipelines()


def test_the_cli_sends_the_key_from_the_environment_and_says_what_is_missing(guarded, tmp_path) -> None:
    def kinema(*argv: str, **env: str) -> subprocess.CompletedProcess:
        import os

        return subprocess.run([sys.executable, "-m", "kinema.cli", "--server", guarded.address, *argv],
                              capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in os.environ.items() if k != "KINEMA_API_KEY"} | env)  # fmt: skip

    refused = kinema("jobs", "list")
    assert refused.returncode == 2 and "API key" in refused.stderr and "Traceback" not in refused.stderr
    allowed = kinema("jobs", "list", KINEMA_API_KEY=ACME)
    assert allowed.returncode != 2 and "API key" not in allowed.stderr, allowed.stderr  # past authentication


def test_a_bad_keys_file_stops_the_server_from_starting(tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    pasted = new_key()
    keys.write_text(f"acme {pasted}\n")  # a key where its hash belongs
    proc = ServiceProcess("orchestrator", tmp_path, KINEMA_ARTIFACTS=(tmp_path / "a").as_uri(),
                          KINEMA_API_KEYS_FILE=str(keys), KINEMA_TEXT_ENCODER_URL="127.0.0.1:1",
                          KINEMA_DENOISER_URL="127.0.0.1:1", KINEMA_AUTOENCODER_URL="127.0.0.1:1")  # fmt: skip
    with pytest.raises(RuntimeError, match="exited") as info:
        proc.start(timeout=30)
    assert "expected 'TENANT SHA256'" in str(info.value) and pasted not in str(info.value)
