"""Generate into an S3 artifact store (a real S3 server process): presigned HTTP URLs serve the stored PNG."""

from __future__ import annotations

import hashlib
import urllib.request

import pytest

from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.rpc.process import ServiceProcess
from kinema.storage.s3server import S3Server, S3ServerSettings

from .conftest import stub_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_orchestrator(services, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("orchestrator-s3")
    with S3Server(S3ServerSettings(data_dir=root / "data"), log_path=root / "weed.log") as s3:
        env = {f"KINEMA_{name.upper()}_URL": s.address for name, s in services.items()}
        env |= {"KINEMA_S3_ACCESS_KEY": s3.access_key, "KINEMA_S3_SECRET_KEY": s3.secret_key}
        proc = ServiceProcess(
            "orchestrator", root, KINEMA_ARTIFACTS=f"s3://kinema-artifacts?endpoint={s3.endpoint}", **env
        )
        proc.start()
        try:
            yield proc
        finally:
            proc.stop()


def test_generate_into_s3(s3_orchestrator) -> None:
    channel, stub = stub_of(s3_orchestrator)
    with channel:
        request = pb.PipelineRequest(pipeline="text_to_image", prompts=["a yellow cone"], seed=5, steps=2)
        (output,) = list(stub.Generate(pb.GenerateRequest(request=request), timeout=120))[-1].result.outputs
        assert output.artifact.uri.startswith("s3://kinema-artifacts/default/")
        data = urllib.request.urlopen(output.presigned_url, timeout=10).read()
        assert hashlib.sha256(data).hexdigest() == output.artifact.sha256 and data.startswith(b"\x89PNG")
        got = stub.GetArtifact(pb.GetArtifactRequest(sha256=output.artifact.sha256), timeout=10)
        assert got.provenance == output.provenance and got.provenance.seed == 5
        assert urllib.request.urlopen(got.presigned_url, timeout=10).read() == data
