"""The end-to-end suite: a client of a running Kinema, through its public gRPC contract only.

It takes everything from the environment, so the same tests run against the local stack (`make e2e`, which starts
one with `kinema stack up`) and against a cluster (e2e/kind/):

- `KINEMA_E2E_ADDRESS` (required): the orchestrator's gRPC address, host:port.
- `KINEMA_E2E_METRICS` (required by the metrics test): comma-separated `name=url` pairs of the Prometheus endpoints
  to scrape, e.g. `orchestrator=http://127.0.0.1:9464/metrics,denoiser=...`.
- `KINEMA_E2E_TIMEOUT`: seconds any one call may take (default 300; a cold cluster can be slow).

Every test runs in tenants of its own (`kinema-tenant` metadata, a fresh random name per run), so the suite can
run against a platform that serves others, and again, without seeing what earlier runs made.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import urllib.parse
from collections.abc import Iterator

import grpc
import pytest

from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

ADDRESS_ENV = "KINEMA_E2E_ADDRESS"
METRICS_ENV = "KINEMA_E2E_METRICS"
TIMEOUT = float(os.environ.get("KINEMA_E2E_TIMEOUT", "300"))


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get(ADDRESS_ENV):
        raise pytest.UsageError(
            f"{ADDRESS_ENV} is not set: give the orchestrator's host:port, or run `make e2e`, which starts a local "
            "stack and points the suite at it"
        )


class Orchestrator:
    """The orchestrator as one tenant sees it: the stub, with the tenant's metadata and a deadline on every call."""

    def __init__(self, channel: grpc.Channel, tenant: str) -> None:
        self.stub = pb_grpc.OrchestratorStub(channel)
        self.tenant = tenant
        self.metadata = (("kinema-tenant", tenant),)

    def call(self, method: str, request, timeout: float = TIMEOUT):
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)

    def generate(self, timeout: float = TIMEOUT, **fields) -> list[pb.GenerateResponse]:
        return list(self.call("Generate", pb.GenerateRequest(request=pipeline_request(**fields)), timeout))

    def submit(self, key: str = "", **fields) -> pb.Job:
        request = pb.SubmitJobRequest(request=pipeline_request(**fields), idempotency_key=key)
        return self.call("SubmitJob", request).job

    def get(self, job_id: str) -> pb.Job:
        return self.call("GetJob", pb.GetJobRequest(id=job_id)).job

    def watch(self, job_id: str) -> Iterator[pb.Job]:
        for response in self.call("WatchJob", pb.WatchJobRequest(id=job_id)):
            yield response.job

    def finished(self, job_id: str) -> pb.Job:
        *_, last = self.watch(job_id)
        return last

    def cancel(self, job_id: str) -> pb.Job:
        return self.call("CancelJob", pb.CancelJobRequest(id=job_id)).job

    def upload(self, data: bytes, media_type: str, filename: str = "", chunk: int = 1 << 20):
        """UploadArtifactResponse for `data` sent as a header and `chunk`-byte pieces."""
        header = pb.UploadHeader(media_type=media_type, size_bytes=len(data), filename=filename,
                                 sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
        parts = [pb.UploadArtifactRequest(header=header)]
        parts += [pb.UploadArtifactRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)]
        return self.stub.UploadArtifact(iter(parts), metadata=self.metadata, timeout=TIMEOUT)

    def artifact(self, sha256: str, ttl: int = 0) -> pb.GetArtifactResponse:
        return self.call("GetArtifact", pb.GetArtifactRequest(sha256=sha256, url_ttl_seconds=ttl))


def pipeline_request(pipeline: str = "text_to_image", **fields) -> pb.PipelineRequest:
    inputs = fields.pop("inputs", {})
    request = pb.PipelineRequest(pipeline=pipeline, **fields)
    for name, sha256 in inputs.items():
        request.inputs[name].sha256 = sha256
    return request


@pytest.fixture(scope="session")
def address() -> str:
    return os.environ[ADDRESS_ENV]


@pytest.fixture(scope="session")
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        yield channel


@pytest.fixture(scope="session")
def run_id() -> str:
    return secrets.token_hex(4)


@pytest.fixture(scope="session")
def kinema(channel: grpc.Channel, run_id: str) -> Orchestrator:
    """The orchestrator as this run's main tenant."""
    return Orchestrator(channel, f"e2e-{run_id}")


@pytest.fixture(scope="session")
def other_tenant(channel: grpc.Channel, run_id: str) -> Orchestrator:
    return Orchestrator(channel, f"e2e-{run_id}-other")


@pytest.fixture(scope="session")
def metrics_urls() -> dict[str, str]:
    """The Prometheus endpoints to scrape, by component name, from KINEMA_E2E_METRICS."""
    raw = os.environ.get(METRICS_ENV, "")
    pairs = [p.split("=", 1) for p in raw.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 or not urllib.parse.urlsplit(p[1]).scheme for p in pairs):
        pytest.fail(f"{METRICS_ENV} must hold comma-separated name=url pairs (got {raw!r})")
    return {name.strip(): url.strip() for name, url in pairs}
