"""The prompt length limit at the orchestrator, its own process with KINEMA_MAX_PROMPT_CHARS=64, Redis for jobs and no
worker (a submitted job stays queued) and no model service up: the limit is checked before anything is called, so a
prompt over it is INVALID_ARGUMENT for every pipeline, in Generate and SubmitJob, and one at it is taken."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kinema.jobs.redis_server import RedisServer
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.rpc.process import ServiceProcess, free_port
from kinema.rpc.status import parse_error_detail

from .conftest import start_orchestrator, stub_of

pytestmark = pytest.mark.slow

LIMIT = 64
AT_LIMIT = ("a small red sphere to the left of a blue cube " * 2)[:LIMIT]
OVER = "x" * (LIMIT + 1)


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("prompt-limit")
    with RedisServer(log_path=root / "redis.log") as redis:
        down = {name: f"127.0.0.1:{free_port()}" for name in ("text_encoder", "denoiser", "autoencoder", "depth")}
        proc = start_orchestrator(root, root / "artifacts", down, KINEMA_REDIS_URL=redis.url,
                                  KINEMA_MAX_PROMPT_CHARS=str(LIMIT))  # fmt: skip
        try:
            yield proc
        finally:
            proc.stop()


@pytest.fixture(scope="module")
def stub(orchestrator):
    channel, stub = stub_of(orchestrator)
    yield stub
    channel.close()


def _refused(call, field: str, length: int = LIMIT + 1) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    e = info.value
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert e.details().startswith(f"{field} has {length} characters, over this server's limit of {LIMIT} "
                                  "(KINEMA_MAX_PROMPT_CHARS)"), e.details()  # fmt: skip
    detail = parse_error_detail(e.trailing_metadata())
    assert (detail.reason, detail.field) == ("PROMPT_TOO_LONG", field)
    assert (detail.metadata["limit"], detail.metadata["length"]) == (str(LIMIT), str(length))


@pytest.mark.parametrize("pipeline", ["text_to_image", "image_to_image", "inpaint", "edit_video"])
def test_a_prompt_over_the_limit_is_refused_before_any_work(stub, pipeline) -> None:
    over = pb.PipelineRequest(pipeline=pipeline, prompts=[OVER])
    _refused(lambda: list(stub.Generate(pb.GenerateRequest(request=over), timeout=30)), "prompts[0]")
    _refused(lambda: stub.SubmitJob(pb.SubmitJobRequest(request=over), timeout=30), "prompts[0]")
    negative = pb.PipelineRequest(pipeline=pipeline, prompts=[AT_LIMIT], negative_prompt="y" * 5000)
    _refused(lambda: list(stub.Generate(pb.GenerateRequest(request=negative), timeout=30)), "negative_prompt", 5000)


def test_prompts_at_the_limit_are_taken_and_the_server_stays_up(stub, orchestrator) -> None:
    request = pb.PipelineRequest(pipeline="text_to_image", prompts=[AT_LIMIT, "\U0001f7e5" * LIMIT], steps=1,
                                 negative_prompt="y" * LIMIT)  # fmt: skip
    job = stub.SubmitJob(pb.SubmitJobRequest(request=request), timeout=30).job
    assert job.state == pb.JOB_STATE_QUEUED and list(job.request.prompts) == list(request.prompts)
    _refused(lambda: list(stub.Generate(pb.GenerateRequest(request=pb.PipelineRequest(
        pipeline="text_to_image", prompts=["ok", OVER])), timeout=30)), "prompts[1]")  # fmt: skip
    with pytest.raises(grpc.RpcError) as info:  # past the check: the run meets the model services, all down
        list(stub.Generate(pb.GenerateRequest(request=request), timeout=60))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()

    assert orchestrator.proc.poll() is None
    with grpc.insecure_channel(orchestrator.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert stub.GetJob(pb.GetJobRequest(id=job.id), timeout=30).job.state == pb.JOB_STATE_QUEUED
