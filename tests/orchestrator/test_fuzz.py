"""Fuzzing the orchestrator over real gRPC (a sample; `bench/fuzz.py` sends thousands): malformed requests for every
RPC, jobs included (real Redis and S3; no worker, so accepted jobs wait queued), get OK or a defined status, never
INTERNAL or UNKNOWN, and the server stays healthy and still generates."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.orchestration.pipelines import REGISTRY
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from kinema.rpc.process import ServiceProcess
from kinema.testing.fuzz import FORBIDDEN, classify, messages

from .conftest import jobs_env

EXAMPLES = int(os.environ.get("KINEMA_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
# Steer part of the draws past the first checks into the pipelines, with few enough steps to stay cheap.
STEERED = {
    "pipeline": st.one_of(st.sampled_from(REGISTRY.names()), st.text(max_size=12)),
    "steps": st.one_of(st.integers(-3, 3), st.sampled_from([1001, 2**31 - 1])),
    "prompts": st.lists(st.text(max_size=30), max_size=3),
}
TENANTS = st.one_of(st.just(()), st.sampled_from(["acme", "", "A", "a" * 64, "../x", "a b", "X-Y"]).map(lambda t: (
    ("kinema-tenant", t),)))  # fmt: skip


@pytest.fixture(scope="module")
def fuzzed(services, job_s3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("fuzz")
    with RedisServer(RedisSettings(), log_path=root / "redis.log") as redis_server:
        env = jobs_env({name: s.address for name, s in services.items()}, job_s3, redis_server.url, "kinema-fuzz")
        proc = ServiceProcess("orchestrator", root, **env).start()
        try:
            yield proc
        finally:
            proc.stop()


def upload_streams() -> st.SearchStrategy[list[pb.UploadArtifactRequest]]:
    return st.lists(messages(pb.UploadArtifactRequest), max_size=5)


RPCS = {
    "Generate": (messages(pb.GenerateRequest, overrides=STEERED), False),
    "SubmitJob": (messages(pb.SubmitJobRequest, overrides=STEERED), False),
    "GetJob": (messages(pb.GetJobRequest), False),
    "WatchJob": (messages(pb.WatchJobRequest), False),
    "CancelJob": (messages(pb.CancelJobRequest), False),
    "ListJobs": (messages(pb.ListJobsRequest), False),
    "UploadArtifact": (upload_streams(), True),
    "GetArtifact": (messages(pb.GetArtifactRequest), False),
    "ListModels": (messages(pb.ListModelsRequest), False),
    "ListPipelines": (messages(pb.ListPipelinesRequest), False),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RPCS))
def test_malformed_requests_get_a_defined_status_and_the_server_stays_up(fuzzed, method) -> None:
    strategy, streaming = RPCS[method]
    seen: dict[grpc.StatusCode, int] = {}
    with fuzzed.channel() as channel:
        call = getattr(pb_grpc.OrchestratorStub(channel), method)

        @FUZZ
        @given(strategy, TENANTS)
        def one(request, metadata) -> None:
            sent = iter(request) if streaming else request
            try:
                code = classify(lambda: call(sent, metadata=metadata, timeout=60))
            except grpc.RpcError as e:
                code = e.code()
            seen[code] = seen.get(code, 0) + 1
            assert code not in FORBIDDEN, (code, str(request)[:500], metadata)

        one()
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        events = list(pb_grpc.OrchestratorStub(channel).Generate(
            pb.GenerateRequest(request=pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"], steps=1)),
            timeout=120))  # fmt: skip
        assert events[-1].result.outputs  # still generates
    assert sum(seen.values()) >= min(EXAMPLES, 10), seen
