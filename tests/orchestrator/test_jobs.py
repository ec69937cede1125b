"""Jobs end to end over real processes: Triton and the model services, a SeaweedFS S3 server, redis-server, a
Celery worker (threads pool) running `services.orchestrator.worker` and the orchestrator, all over loopback."""

from __future__ import annotations

import hashlib
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest
from celery import Celery

from kinema.jobs.celery_app import CeleryWorker
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.orchestration.jobs import JobStore
from kinema.orchestration.worker import TASK_NAME
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.rpc.process import ServiceProcess, free_port
from kinema.rpc.status import parse_error_detail
from kinema.storage.artifacts import S3ArtifactStore

from .conftest import jobs_env, model_calls, start_job_worker, stub_of

pytestmark = pytest.mark.slow

Q, R, C, F, X = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED,
                 pb.JOB_STATE_CANCELLED)  # fmt: skip
TERMINAL = (C, F, X)
BUCKET = "kinema-jobs"
PROMPT = "a small red sphere to the left of a blue cube"


def wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:g} s")
        time.sleep(0.05)


def unsigned(job: pb.Job) -> pb.Job:
    """`job` without its outputs' presigned URLs, which every response signs afresh."""
    copy = pb.Job()
    copy.CopyFrom(job)
    for o in copy.outputs:
        o.ClearField("presigned_url")
        o.ClearField("expires_at")
    return copy


def tenant_md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("kinema-tenant", tenant),)


def artifacts_of(s3, tenant: str, bucket: str = BUCKET) -> list[str]:
    """The sha256 of every artifact the tenant holds in the bucket."""
    store = S3ArtifactStore(s3.endpoint, s3.access_key, s3.secret_key, bucket)
    return sorted(a.sha256 for a in store.list(tenant, limit=1000))


class Client:
    """The orchestrator's job RPCs for one tenant."""

    def __init__(self, proc: ServiceProcess, tenant: str = "default") -> None:
        self.channel, self.stub = stub_of(proc)
        self.md = tenant_md(tenant)

    def submit(self, key: str = "", **fields) -> pb.Job:
        request = pb.PipelineRequest(pipeline="text_to_image", **({"prompts": [PROMPT], "steps": 2} | fields))
        submit = pb.SubmitJobRequest(request=request, idempotency_key=key)
        return self.stub.SubmitJob(submit, timeout=30, metadata=self.md).job

    def get(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=30, metadata=self.md).job

    def watch(self, job_id: str, timeout: float = 120) -> Iterator[pb.Job]:
        for event in self.stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=timeout, metadata=self.md):
            yield event.job

    def cancel(self, job_id: str) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(id=job_id), timeout=30, metadata=self.md).job

    def list(self, **kw) -> pb.ListJobsResponse:
        return self.stub.ListJobs(pb.ListJobsRequest(**kw), timeout=30, metadata=self.md)

    def finished(self, job_id: str, timeout: float = 120) -> pb.Job:
        *_, last = self.watch(job_id, timeout)
        assert last.state in TERMINAL
        return last


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("jobs-redis")
    with RedisServer(RedisSettings(data_dir=root / "data"), log_path=root / "redis.log") as server:
        yield server


@pytest.fixture(scope="module")
def env(services, job_s3, redis_server) -> dict[str, str]:
    return jobs_env({name: s.address for name, s in services.items()}, job_s3, redis_server.url, BUCKET)


@pytest.fixture(scope="module")
def worker(env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    """One job at a time, so that a second job waits in the queue while a first one runs."""
    w = start_job_worker(tmp_path_factory.mktemp("jobs-worker"), env, concurrency=1)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def jobs_orchestrator(env, worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    proc = ServiceProcess("orchestrator", tmp_path_factory.mktemp("jobs-orchestrator"), **env).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(jobs_orchestrator) -> Iterator[Client]:
    c = Client(jobs_orchestrator)
    yield c
    c.channel.close()


def test_a_job_streams_progress_and_completes_with_the_artifact_generate_makes(client, job_s3) -> None:
    submitted = client.submit(steps=4)
    assert submitted.state == Q and submitted.attempts == 0 and submitted.tenant == "default"
    assert submitted.request.HasField("seed")  # drawn at submit, so that a rerun reproduces the outputs
    snapshots = list(client.watch(submitted.id))
    states = [s.state for s in snapshots]
    assert states[0] in (Q, R) and states[-1] == C and set(states) <= {Q, R, C}
    steps = [s.progress.step for s in snapshots if s.state == R and s.HasField("progress")]
    assert steps == sorted(steps) and steps and all(s.progress.total == 4 for s in snapshots if s.progress.total)
    done = snapshots[-1]
    assert (done.progress.step, done.progress.total, done.attempts) == (4, 4, 1)
    assert done.started_at.seconds and done.finished_at.ToNanoseconds() >= done.started_at.ToNanoseconds()
    assert done.request == submitted.request and not done.HasField("error")
    (output,) = done.outputs
    assert output.seed == done.request.seed and output.provenance.seed == done.request.seed
    assert output.artifact.uri.startswith(f"s3://{BUCKET}/default/") and output.expires_at.seconds > time.time()
    data = urllib.request.urlopen(output.presigned_url, timeout=10).read()
    assert hashlib.sha256(data).hexdigest() == output.artifact.sha256 and data.startswith(b"\x89PNG")
    assert output.artifact.sha256 in artifacts_of(job_s3, "default")

    # GetJob reads the same record, with freshly signed URLs.
    got = client.get(done.id)
    assert got.outputs[0].presigned_url and unsigned(got) == unsigned(done)

    # Generate runs the same pipeline code: the recorded request makes the very same artifact.
    events = list(client.stub.Generate(pb.GenerateRequest(request=done.request), timeout=120))
    assert events[-1].result.outputs[0].artifact == output.artifact


T2I = {"pipeline": "text_to_image", "prompts": ["a cube"], "steps": 2}


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"steps": 1001}, grpc.StatusCode.INVALID_ARGUMENT, "steps"),
        ({"prompts": []}, grpc.StatusCode.INVALID_ARGUMENT, "prompts"),
        ({"strength": 0.5}, grpc.StatusCode.INVALID_ARGUMENT, "strength"),
        ({"width": 64, "height": 128}, grpc.StatusCode.INVALID_ARGUMENT, "width"),
        ({"pipeline": "video"}, grpc.StatusCode.NOT_FOUND, "pipeline"),
    ],
)
def test_bad_requests_are_rejected_at_submit_and_never_become_jobs(client, change, code, field) -> None:
    from google.protobuf import json_format

    before = [j.id for j in client.list(page_size=1000).jobs]
    request = json_format.ParseDict(T2I | change, pb.PipelineRequest())
    with pytest.raises(grpc.RpcError) as info:
        client.stub.SubmitJob(pb.SubmitJobRequest(request=request), timeout=30)
    assert (info.value.code(), parse_error_detail(info.value.trailing_metadata()).field) == (code, field)
    assert [j.id for j in client.list(page_size=1000).jobs] == before


def test_bad_job_ids_tokens_and_keys(client) -> None:
    cases = [
        (lambda: client.get(uuid.uuid4().hex), grpc.StatusCode.NOT_FOUND),
        (lambda: client.cancel(uuid.uuid4().hex), grpc.StatusCode.NOT_FOUND),
        (lambda: list(client.watch(uuid.uuid4().hex)), grpc.StatusCode.NOT_FOUND),
        (lambda: client.get(""), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.get("a:b"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.list(page_size=-1), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.list(page_token="nonsense"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.submit(key="x" * 129), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code, info.value.details()
        assert "Traceback" not in info.value.details()


def test_jobs_belong_to_their_tenant(client, jobs_orchestrator) -> None:
    acme = Client(jobs_orchestrator, "acme")
    job = acme.submit(steps=1)
    for call in (client.get, client.cancel, lambda i: list(client.watch(i))):
        with pytest.raises(grpc.RpcError) as info:
            call(job.id)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert job.id not in [j.id for j in client.list(page_size=1000).jobs]
    done = acme.finished(job.id)
    assert done.state == C and done.tenant == "acme" and f"/{BUCKET}/acme/" in done.outputs[0].artifact.uri
    assert [j.id for j in acme.list().jobs] == [job.id]
    acme.channel.close()


def test_failures_end_the_job_failed_with_the_status_generate_would_give(client) -> None:
    # Known only once the autoencoder answers: accepted at submit, FAILED when run.
    bad_size = client.finished(client.submit(width=12, height=12).id)
    assert bad_size.state == F and not bad_size.outputs and bad_size.attempts == 1
    assert bad_size.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and bad_size.error.detail.field == "width"
    assert "Traceback" not in bad_size.error.message and bad_size.error.detail.metadata["request_id"] == bad_size.id
    missing = pb.SubmitJobRequest(request=pb.PipelineRequest(**T2I))
    missing.request.models["denoiser"].name = "denoiser_nope"
    job = client.finished(client.stub.SubmitJob(missing, timeout=30).job.id)
    assert job.state == F and job.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert (job.error.detail.reason, job.error.detail.field) == ("MODEL_NOT_FOUND", "models.denoiser")


def test_cancel_stops_a_running_job_in_the_denoiser_and_a_queued_one_before_it_runs(
    client, services, job_s3, worker
) -> None:
    stored = artifacts_of(job_s3, "default")
    running = client.submit(prompts=["a purple cube"], steps=1000)
    watch = client.watch(running.id)
    for snapshot in watch:
        if snapshot.state == R and snapshot.progress.step >= 3:
            break
    queued = client.submit(prompts=["a green cone"], steps=2)  # the worker runs one job at a time
    assert client.get(queued.id).state == Q
    now = client.cancel(queued.id)
    assert (now.state, now.cancel_requested, now.attempts) == (X, True, 0) and now.finished_at.seconds

    asked = client.cancel(running.id)
    assert asked.cancel_requested and asked.state in (R, X)
    *_, last = watch  # the same watch ends with the terminal snapshot
    assert last.state == X and not last.outputs and last.progress.step < 1000
    time.sleep(1.0)  # let an evaluation in flight finish
    calls = model_calls(services["denoiser"])
    time.sleep(1.5)
    assert model_calls(services["denoiser"]) == calls  # the service's loop stopped
    assert artifacts_of(job_s3, "default") == stored  # a cancelled job stores nothing
    assert client.cancel(running.id) == client.get(running.id)  # idempotent: a terminal job is returned as it is

    # The worker took the cancelled job's message next and dropped it: it never ran.
    after = client.submit(prompts=["a yellow cube"], steps=1)
    assert client.finished(after.id).state == C
    again = client.get(queued.id)
    assert (again.state, again.attempts, again.HasField("started_at")) == (X, 0, False)


def test_list_jobs_pages_newest_first_and_filters_by_state(jobs_orchestrator) -> None:
    lister = Client(jobs_orchestrator, "lister")
    ids = [lister.submit(prompts=[f"a cube number {i}"], steps=1).id for i in range(3)]
    lister.cancel(ids[1])  # most likely still queued behind ids[0]; it may have run already
    states = {job_id: lister.finished(job_id).state for job_id in ids}
    first = lister.list(page_size=2)
    second = lister.list(page_size=2, page_token=first.next_page_token)
    listed = [*first.jobs, *second.jobs]
    assert [j.id for j in listed] == ids[::-1] and not second.next_page_token
    created = [j.created_at.ToNanoseconds() for j in listed]
    assert created == sorted(created, reverse=True)
    for state in (C, X):
        assert [j.id for j in lister.list(state=state).jobs] == [i for i in ids[::-1] if states[i] == state]
    assert states[ids[0]] == states[ids[2]] == C and set(states.values()) <= {C, X}
    assert all(j.outputs[0].presigned_url for j in lister.list(state=C).jobs)
    with pytest.raises(grpc.RpcError) as info:
        lister.list(page_size=2, page_token=first.next_page_token, state=C)  # a token is bound to its filter
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert parse_error_detail(info.value.trailing_metadata()).reason == "PAGE_TOKEN_MISMATCH"
    lister.channel.close()


def test_an_idempotency_key_makes_a_resubmit_return_the_same_job(jobs_orchestrator) -> None:
    idem = Client(jobs_orchestrator, "idem")
    first = idem.submit(key="order-17", steps=1)
    assert idem.submit(key="order-17", steps=1).id == first.id
    with pytest.raises(grpc.RpcError) as info:
        idem.submit(key="order-17", steps=2)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    detail = parse_error_detail(info.value.trailing_metadata())
    assert (detail.reason, detail.field, detail.metadata["job_id"]) == ("IDEMPOTENCY_KEY_REUSED", "idempotency_key",
                                                                        first.id)  # fmt: skip
    assert [j.id for j in idem.list().jobs] == [first.id]
    assert idem.finished(first.id).state == C
    # A finished job's key still names it.
    assert unsigned(idem.submit(key="order-17", steps=1)) == unsigned(idem.get(first.id))
    idem.channel.close()


def test_jobs_outlive_the_orchestrator_that_took_them(env, worker, tmp_path) -> None:
    first = ServiceProcess("orchestrator", tmp_path, **env).start()
    c = Client(first, "restart")
    job = c.submit(prompts=["a blue sphere"], steps=60)
    for snapshot in c.watch(job.id):
        if snapshot.state == R:
            break
    c.channel.close()
    assert first.stop() == 0
    second = ServiceProcess("orchestrator", tmp_path, **env).start()  # a new server on the same Redis
    try:
        c = Client(second, "restart")
        seen = c.get(job.id)
        assert seen.id == job.id and seen.request == job.request and seen.created_at == job.created_at
        done = c.finished(job.id)
        assert done.state == C and len(done.outputs) == 1 and done.attempts == 1
        assert [j.id for j in c.list().jobs] == [job.id]
        c.channel.close()
    finally:
        second.stop()


def test_a_transient_failure_is_retried_and_the_job_stores_one_artifact(
    services, triton, job_s3, redis_server, tmp_path
) -> None:
    # A stack of its own on Redis database 1, whose denoiser service does not run yet: the first attempt gets
    # UNAVAILABLE, the job goes back to the queue, and a retry after the service started completes it.
    denoiser = ServiceProcess("denoiser", tmp_path, KINEMA_BACKEND="triton", KINEMA_TRITON_URL=triton.grpc_url,
                              KINEMA_MAX_MESSAGE_BYTES=str(4 << 20))  # fmt: skip
    addresses = {name: s.address for name, s in services.items()} | {"denoiser": denoiser.address}
    retries = {"KINEMA_JOB_RETRY_BACKOFF_SECONDS": "1", "KINEMA_JOB_MAX_RETRIES": "8", "KINEMA_JOB_MAX_ATTEMPTS": "10"}
    env = jobs_env(addresses, job_s3, redis_server.url_for(1), BUCKET, **retries)
    worker = start_job_worker(tmp_path, env)
    orchestrator = ServiceProcess("orchestrator", tmp_path, **env)
    celery = Celery(broker=redis_server.url_for(1), backend=redis_server.url_for(1))
    try:
        orchestrator.start()
        c = Client(orchestrator, "flaky")
        job = c.submit(prompts=["a red cone"], steps=2)  # the seed is drawn at submit
        wait_for(lambda: c.get(job.id).attempts >= 1 and c.get(job.id).state == Q, 60, "the first attempt's failure")
        denoiser.start()
        done = c.finished(job.id, timeout=120)
        assert done.state == C and done.attempts >= 2 and not done.HasField("error")
        (output,) = done.outputs
        assert artifacts_of(job_s3, "flaky") == [output.artifact.sha256]

        # The same job delivered again (acks_late: a lost ack) changes nothing and stores nothing: the record
        # took its result once.
        redelivered = celery.send_task(TASK_NAME, args=("flaky", job.id), task_id=uuid.uuid4().hex)
        assert redelivered.get(timeout=60) == "JOB_STATE_COMPLETED"
        assert unsigned(c.get(job.id)) == unsigned(done)
        assert artifacts_of(job_s3, "flaky") == [output.artifact.sha256]

        # A worker that died after storing the outputs but before recording them leaves the record RUNNING; the
        # redelivered job runs again, with the seed fixed at submit, and makes the very same bytes: still one
        # artifact, and one result.
        def crashed(record: pb.Job) -> bool:
            record.state = R
            record.ClearField("outputs")
            record.ClearField("finished_at")
            return True

        records = JobStore(redis_server.url_for(1))
        records._update("flaky", job.id, crashed)
        records.close()
        rerun = celery.send_task(TASK_NAME, args=("flaky", job.id), task_id=uuid.uuid4().hex)
        assert rerun.get(timeout=60) == "JOB_STATE_COMPLETED"
        again = c.get(job.id)
        assert again.state == C and again.attempts == done.attempts + 1
        assert [o.artifact for o in again.outputs] == [output.artifact]
        assert artifacts_of(job_s3, "flaky") == [output.artifact.sha256]
        c.channel.close()
    finally:
        celery.close()
        orchestrator.stop()
        worker.stop()
        denoiser.stop()


def test_redis_down_is_unavailable_the_server_stays_up_and_recovers(job_s3, tmp_path) -> None:
    # No model services and no worker are needed: submit checks the request without them and the job waits queued.
    redis_server = RedisServer(RedisSettings(data_dir=tmp_path / "redis"))
    redis_server.__enter__()
    addresses = {name: f"127.0.0.1:{free_port()}" for name in ("text_encoder", "denoiser", "autoencoder")}
    proc = ServiceProcess("orchestrator", tmp_path, **jobs_env(addresses, job_s3, redis_server.url, BUCKET))
    try:
        proc.start()
        c = Client(proc)
        job = c.submit()
        redis_server.stop()
        calls = {
            "submit": lambda: c.submit(),
            "get": lambda: c.get(job.id),
            "watch": lambda: list(c.watch(job.id)),
            "cancel": lambda: c.cancel(job.id),
            "list": lambda: c.list(),
        }
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert time.monotonic() - started < 10, name
            err = info.value
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (name, err.details())
            assert "Redis at redis://127.0.0.1" in err.details() and "unreachable" in err.details(), name
            assert "Traceback" not in err.details()
        assert c.stub.ListPipelines(pb.ListPipelinesRequest(), timeout=10).pipelines  # the server is still up
        with RedisServer(redis_server.resolved_settings):
            assert c.get(job.id) == job  # kept on Redis' disk; the server reconnects by itself
            again = c.submit()
            assert again.state == Q and {j.id for j in c.list().jobs} == {job.id, again.id}
        c.channel.close()
    finally:
        proc.stop()
        redis_server.stop()
