"""Admission control of the orchestrator as its own process over the session's real model services: with
KINEMA_MAX_IN_FLIGHT=1 a second Generate is refused while a first runs, and with KINEMA_MAX_QUEUED_JOBS=2 (Redis, no
worker, so that jobs stay queued) a third SubmitJob is refused; both with a retry hint, while cheap calls answer."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kinema.client import KinemaClient
from kinema.errors import ResourceExhausted
from kinema.jobs.redis_server import RedisServer
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.rpc.process import ServiceProcess
from kinema.rpc.status import RETRY_AFTER_KEY, from_rpc_error, parse_error_detail

from .conftest import start_orchestrator, stub_of

pytestmark = pytest.mark.slow

PROMPT = "a small red sphere to the left of a blue cube"


@pytest.fixture(scope="module")
def busy_orchestrator(services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("admission")
    with RedisServer(log_path=root / "redis.log") as redis:
        addresses = {name: s.address for name, s in services.items()}
        proc = start_orchestrator(root, root / "artifacts", addresses, KINEMA_REDIS_URL=redis.url,
                                  KINEMA_MAX_IN_FLIGHT="1", KINEMA_MAX_QUEUED_JOBS="2")  # fmt: skip
        try:
            yield proc
        finally:
            proc.stop()


@pytest.fixture(scope="module")
def stub(busy_orchestrator):
    channel, stub = stub_of(busy_orchestrator)
    yield stub
    channel.close()


def _rejected(proc: ServiceProcess) -> dict[tuple[str, str], float]:
    """kinema_rpc_rejected_total by (method, reason)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5).read().decode()
    return {(s.labels["method"], s.labels["reason"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "kinema_rpc_rejected_total"}  # fmt: skip


def _request(steps: int, seed: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(request=pb.PipelineRequest(pipeline="text_to_image", prompts=[PROMPT], steps=steps,
                                                         seed=seed))  # fmt: skip


def test_a_second_generate_is_refused_while_the_first_completes(stub, busy_orchestrator) -> None:
    job = stub.SubmitJob(pb.SubmitJobRequest(request=_request(2).request), timeout=30).job  # for GetJob below
    first = stub.Generate(_request(20), timeout=300)
    assert next(first).HasField("progress")  # running: it holds the one place

    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(_request(2, seed=1), timeout=60))
    refused = info.value
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KINEMA_MAX_IN_FLIGHT" in refused.details()
    assert parse_error_detail(refused.trailing_metadata()).reason == "SERVER_BUSY"
    assert int(dict(refused.trailing_metadata())[RETRY_AFTER_KEY]) > 0
    assert from_rpc_error(refused).retry_after > 0

    # Cheap calls answer while the place is taken.
    assert {c.capability for c in stub.ListModels(pb.ListModelsRequest(), timeout=30).capabilities} >= {"denoiser"}
    assert stub.ListPipelines(pb.ListPipelinesRequest(), timeout=30).pipelines
    assert stub.GetJob(pb.GetJobRequest(id=job.id), timeout=30).job.state == pb.JOB_STATE_QUEUED
    channel = grpc.insecure_channel(busy_orchestrator.address)
    with channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    *_, last = list(first)
    assert last.HasField("result") and len(last.result.outputs) == 1  # the first was never disturbed
    events = list(stub.Generate(_request(2, seed=2), timeout=120))  # the place is free again
    assert events[-1].HasField("result")
    assert _rejected(busy_orchestrator)[("Generate", "SERVER_BUSY")] == 1


def test_the_client_surfaces_the_hint_and_the_cli_prints_it(stub, busy_orchestrator, capsys, tmp_path) -> None:
    from kinema.cli import EXIT_UNAVAILABLE
    from kinema.cli import main as kinema_main

    first = stub.Generate(_request(20, seed=5), timeout=300)
    assert next(first).HasField("progress")
    with KinemaClient(busy_orchestrator.address, tenant="hint") as client:
        try:
            with pytest.raises(ResourceExhausted) as info:
                client.generate(PROMPT, steps=2)
            assert info.value.reason == "SERVER_BUSY" and info.value.retry_after > 0
            code = kinema_main(["generate", PROMPT, "--server", busy_orchestrator.address, "--steps", "2", "-q",
                                "-o", str(tmp_path / "unused.png")])  # fmt: skip
        finally:
            first.cancel()
    err = capsys.readouterr().err
    assert code == EXIT_UNAVAILABLE, err
    assert "KINEMA_MAX_IN_FLIGHT" in err and "the server is busy; try again in" in err


def test_submit_is_refused_while_the_queue_is_full_and_resubmits_still_answer(stub, busy_orchestrator) -> None:
    md = (("kinema-tenant", "queue"),)
    before = _rejected(busy_orchestrator).get(("SubmitJob", "JOB_QUEUE_FULL"), 0)
    waiting = len(stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_QUEUED), timeout=30).jobs)  # other tests'
    keyed = None
    for i in range(2 - waiting):
        submit = pb.SubmitJobRequest(request=_request(2, seed=10 + i).request, idempotency_key=f"key-{i}")
        keyed = stub.SubmitJob(submit, timeout=30, metadata=md).job
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitJob(pb.SubmitJobRequest(request=_request(2, seed=99).request), timeout=30, metadata=md)
    refused = info.value
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    detail = parse_error_detail(refused.trailing_metadata())
    assert detail.reason == "JOB_QUEUE_FULL" and detail.metadata["limit"] == "2"
    assert "KINEMA_MAX_QUEUED_JOBS" in refused.details() and from_rpc_error(refused).retry_after == 5.0
    queued = stub.ListJobs(pb.ListJobsRequest(), timeout=30, metadata=md).jobs
    assert len(queued) == 2 - waiting  # the refused submit left no job behind
    if keyed is not None:  # a resubmit with a used key returns its job, full queue or not
        again = pb.SubmitJobRequest(request=keyed.request, idempotency_key=keyed.idempotency_key)
        assert stub.SubmitJob(again, timeout=30, metadata=md).job.id == keyed.id
    assert _rejected(busy_orchestrator)[("SubmitJob", "JOB_QUEUE_FULL")] == before + 1
