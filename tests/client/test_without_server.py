"""The client and the CLI's remote mode where no Kinema server is needed: verified downloads from file:// URLs, an
unreachable server, and a real in-process gRPC server standing in for the orchestrator where a test needs exact
control of what it answers (WatchJob cut off by the server's request timeout)."""

from __future__ import annotations

import hashlib
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from kinema.cli import main
from kinema.client import TENANT_KEY, KinemaClient, download_url, job_state, pipeline_request, read_url, state_name
from kinema.errors import DataLoss, DeadlineExceeded, InvalidInput, NotFound, Unavailable
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from kinema.rpc.process import free_port
from kinema.rpc.status import to_status


def test_download_checks_the_hash_and_writes_whole_or_not_at_all(tmp_path: Path) -> None:
    data = b"\x89PNG pretend" * 1000
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    out = download_url(src.as_uri(), tmp_path / "new" / "out.png", sha, len(data))
    assert out.read_bytes() == data and [p.name for p in out.parent.iterdir()] == ["out.png"]
    assert read_url(src.as_uri(), sha) == data

    out.write_bytes(b"before")
    for wrong_sha, size in (("0" * 64, len(data)), (sha, len(data) + 1)):
        with pytest.raises(DataLoss) as info:
            download_url(src.as_uri(), out, wrong_sha, size)
        assert info.value.reason == "SHA256_MISMATCH" and "nothing was written" in str(info.value)
        assert out.read_bytes() == b"before" and [p.name for p in out.parent.iterdir()] == ["out.png"]
    with pytest.raises(DataLoss):
        read_url(src.as_uri(), "0" * 64)


def test_download_failures_are_domain_errors(tmp_path: Path) -> None:
    with pytest.raises(Unavailable) as info:
        read_url((tmp_path / "gone").as_uri(), "0" * 64)
    assert info.value.reason == "DOWNLOAD_FAILED"
    with pytest.raises(Unavailable) as info:
        read_url(f"http://127.0.0.1:{free_port()}/bucket/key?X-Amz-Signature=secret", "0" * 64, timeout=5)
    assert "secret" not in str(info.value) and "/bucket/key" in str(info.value)  # a signature is a credential
    with pytest.raises(InvalidInput) as info:
        read_url("ftp://example.com/x", "0" * 64)
    assert info.value.reason == "UNSUPPORTED_URL"


def test_request_building_and_job_states() -> None:
    r = pipeline_request("a cube", n=3, seed=0, guidance=0.0, size=32, models={"denoiser": "denoiser"})
    assert list(r.prompts) == ["a cube"] * 3 and r.HasField("seed") and r.HasField("guidance")
    assert (r.width, r.height, r.models["denoiser"].name, r.pipeline) == (32, 32, "denoiser", "text_to_image")
    bare = pipeline_request(["a", "b"])
    assert list(bare.prompts) == ["a", "b"] and not bare.HasField("seed") and not bare.HasField("guidance")
    assert job_state("completed") == job_state("JOB_STATE_COMPLETED") == pb.JOB_STATE_COMPLETED
    assert state_name(pb.JOB_STATE_CANCELLED) == "cancelled"
    with pytest.raises(InvalidInput, match="unknown job state"):
        job_state("done")


def test_the_tenant_key_is_the_servers() -> None:
    from kinema.rpc.auth import TENANT_KEY as SERVER_KEY  # what the servers' `tenant_of` reads

    assert TENANT_KEY == SERVER_KEY


def test_an_unreachable_server_is_unavailable_naming_its_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    with KinemaClient(address, timeout=10) as kinema:
        calls = (kinema.list_pipelines, lambda: kinema.generate("a cube"), lambda: kinema.watch_job("abc"))
        for call in calls:
            with pytest.raises(Unavailable) as info:
                call()
            e = info.value
            assert e.reason == "SERVER_UNREACHABLE" and f"cannot reach the Kinema server at {address}" in str(e)
            assert e.metadata["grpc_code"] == "UNAVAILABLE" and not isinstance(e, grpc.RpcError)


def test_cli_without_or_with_an_unreachable_server(tmp_path: Path, capsys, monkeypatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    out = str(tmp_path / "o.png")
    monkeypatch.delenv("KINEMA_SERVER", raising=False)
    unreachable = f"cannot reach the Kinema server at {address}"
    cases = [
        (["--server", address, "generate", "a cube", "-q", "-o", out], 3, unreachable),
        (["jobs", "watch", "abc", "--server", address], 3, unreachable),
        (["jobs", "list"], 2, "needs a server: pass --server HOST:PORT or set KINEMA_SERVER"),
        (["--server", address, "generate", "a cube", "--models", str(tmp_path)], 2, "--models names a model"),
    ]
    for argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert err.startswith("kinema: error: ") and message in err and err.count("\n") == 1, err
    monkeypatch.setenv("KINEMA_SERVER", address)  # the environment names the server as --server does
    assert main(["generate", "a cube", "-q", "-o", out]) == 3
    assert address in capsys.readouterr().err and not Path(out).exists()
    with pytest.raises(SystemExit) as info:
        main(["--server", "no-port", "jobs", "list"])
    assert info.value.code == 2 and "must be HOST:PORT" in capsys.readouterr().err


class _CutOffWatch(pb_grpc.OrchestratorServicer):
    """WatchJob as the orchestrator answers it past its request timeout, then, watched again, a finished job."""

    def __init__(self) -> None:
        self.watches = 0
        self.tenants: list[str] = []

    def WatchJob(self, request, context):
        self.watches += 1
        self.tenants.append(dict(context.invocation_metadata()).get(TENANT_KEY, ""))
        if request.id == "missing":
            status = to_status(NotFound(f"no job {request.id!r}", reason="JOB_NOT_FOUND", field="id"))
            context.abort_with_status(_Status(status))
        yield pb.WatchJobResponse(job=pb.Job(id=request.id, state=pb.JOB_STATE_RUNNING))
        if self.watches == 1:
            timeout = DeadlineExceeded("request exceeded the server limit of 1 s", reason="SERVER_TIMEOUT")
            context.abort_with_status(_Status(to_status(timeout)))
        yield pb.WatchJobResponse(job=pb.Job(id=request.id, state=pb.JOB_STATE_COMPLETED))


class _Status(grpc.Status):
    def __init__(self, status) -> None:
        self.code, self.details, self.trailing_metadata = status.code, status.details, status.trailing_metadata


@pytest.fixture
def cut_off_server():
    servicer = _CutOffWatch()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_OrchestratorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_watch_job_watches_again_after_the_servers_request_timeout(cut_off_server) -> None:
    servicer, address = cut_off_server
    seen = []
    with KinemaClient(address, tenant="acme") as kinema:
        done = kinema.watch_job("j1", lambda job: seen.append(job.state))
        assert done.state == pb.JOB_STATE_COMPLETED and servicer.watches == 2 and servicer.tenants == ["acme"] * 2
        assert seen == [pb.JOB_STATE_RUNNING, pb.JOB_STATE_RUNNING, pb.JOB_STATE_COMPLETED]
        with pytest.raises(NotFound) as info:
            kinema.watch_job("missing")
        assert (info.value.reason, info.value.field, str(info.value)) == ("JOB_NOT_FOUND", "id", "no job 'missing'")
