"""The job task's pieces in process: the Celery app it registers on, retry waits, the errors a job records, and how
its end is recorded across a Redis outage (a real redis-server, stopped and started again on its data)."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest
import redis

from kinema.errors import InvalidInput, NotFound, Unavailable
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.orchestration.settings import OrchestratorSettings
from kinema.orchestration.worker import TASK_NAME, JobRunner, job_error, make_job_app, retry_wait
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.processes import kill_group
from kinema.rpc.settings import ServiceSettings

BASE = {"text_encoder_url": "te:1", "denoiser_url": "dn:1", "autoencoder_url": "ae:1", "artifacts": "file:///tmp/a"}


def _settings(**kw) -> OrchestratorSettings:
    return OrchestratorSettings(service=ServiceSettings(), **(BASE | kw))


def test_the_job_app_runs_one_task_acks_late_json_only_with_bounded_retries() -> None:
    app = make_job_app(_settings(redis_url="redis://127.0.0.1:1/0", job_max_retries=2, job_max_attempts=4,
                                 job_visibility_timeout_seconds=120, job_retention_seconds=600))  # fmt: skip
    task = app.tasks[TASK_NAME]
    assert task.max_retries == 2 and task.autoretry_for == () and task.runner.jobs.max_attempts == 4
    assert task.acks_late and app.conf.task_reject_on_worker_lost and app.conf.accept_content == ["json"]
    assert app.conf.broker_transport_options["visibility_timeout"] == 120 and app.conf.result_expires == 600
    assert app.conf.worker_pool == "threads"
    with pytest.raises(ValueError, match="KINEMA_REDIS_URL must be set"):
        make_job_app(_settings())


@pytest.mark.parametrize("retries", [0, 1, 3, 10])
def test_retry_waits_grow_and_stay_bounded(retries) -> None:
    random.seed(retries)
    ceiling = min(60.0, 2.0 * 2**retries)
    waits = [retry_wait(retries, 2.0) for _ in range(200)]
    assert all(0.5 * ceiling <= w <= ceiling for w in waits) and max(waits) - min(waits) > 0.1 * ceiling


def test_a_job_records_the_status_generate_would_end_with() -> None:
    error = job_error(InvalidInput("width must be a multiple of 8", reason="OUT_OF_RANGE", field="width"), "j1")
    assert (error.code, error.message) == (3, "width must be a multiple of 8")
    assert (error.detail.reason, error.detail.field, error.detail.metadata["request_id"]) == ("OUT_OF_RANGE", "width",
                                                                                                "j1")  # fmt: skip
    assert job_error(NotFound("no model"), "j1").code == 5
    assert job_error(Unavailable("denoiser down"), "j1").code == 14
    internal = job_error(KeyError("secret internals at /srv/x.py line 7"), "j2")
    assert internal.code == 13 and internal.message == "internal error (request id j2)"
    assert "secret" not in str(internal) and internal.detail.metadata["request_id"] == "j2"


def test_a_job_that_ends_while_redis_is_down_is_recorded_once_redis_is_back(tmp_path) -> None:
    redis_server = RedisServer(RedisSettings(data_dir=tmp_path / "redis"))
    redis_server.__enter__()
    try:
        runner = JobRunner(_settings(redis_url=redis_server.url, job_record_retry_seconds=60))
        job, _ = runner.jobs.create("acme", pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"]))
        assert runner.jobs.start("acme", job.id).state == pb.JOB_STATE_RUNNING
        output = pb.Output(index=0, seed=1)
        output.artifact.sha256 = "ab" * 32
        redis_server.stop()
        with pytest.raises(Unavailable):  # what a write without the retry meets
            runner.jobs.complete("acme", job.id, [output])

        ended: list = []
        writer = threading.Thread(target=lambda: ended.append(
            runner._record("completion", lambda: runner.jobs.complete("acme", job.id, [output]))))  # fmt: skip
        writer.start()
        time.sleep(2.0)
        assert writer.is_alive() and not ended  # still trying
        redis_server = RedisServer(redis_server.resolved_settings)
        redis_server.__enter__()
        writer.join(timeout=30)
        ((after, recorded),) = ended
        assert recorded and after.state == pb.JOB_STATE_COMPLETED
        assert runner.jobs.get("acme", job.id).outputs[0].artifact.sha256 == "ab" * 32

        short = JobRunner(_settings(redis_url=redis_server.url, job_record_retry_seconds=1.0))
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable):  # bounded: gives up after job_record_retry_seconds
            short._record("failure", lambda: short.jobs.get("acme", job.id))
        assert time.monotonic() - started < 15
    finally:
        redis_server.stop()


class _FakeTask:
    """The parts of a bound Celery task that JobRunner.run touches."""

    def __init__(self, retries: int = 0, max_retries: int = 3) -> None:
        self.request = type("Request", (), {"retries": retries, "id": None})()
        self.max_retries = max_retries

    def cancelled(self) -> bool:
        return False


def _waits(runner: JobRunner, monkeypatch, then=None) -> list:
    """Record each wait before a retry (seconds, the record's state then) instead of sleeping; `then` runs after."""
    waits: list = []

    def wait(task, seconds: float) -> None:
        waits.append((seconds, runner.jobs.get("acme", task.job_id).state))
        if then is not None:
            then(len(waits))

    monkeypatch.setattr(runner, "_wait_to_retry", wait)
    return waits


def test_a_busy_model_service_makes_the_job_wait_in_its_run_for_at_least_its_hint(monkeypatch) -> None:
    from kinema.errors import ResourceExhausted

    with RedisServer(RedisSettings()) as redis_server:
        runner = JobRunner(_settings(redis_url=redis_server.url, job_retry_backoff_seconds=0.1))
        request = pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"])
        busy = ResourceExhausted("denoiser is busy", reason="SERVER_BUSY", retry_after=7.0)
        calls: list[int] = []

        def make(task, job, attempt, started):
            calls.append(attempt)
            if len(calls) < 3:
                raise busy
            return []

        monkeypatch.setattr(runner, "_make", make)
        job, _ = runner.jobs.create("acme", request)
        task = _FakeTask()
        task.job_id = job.id
        waits = _waits(runner, monkeypatch)
        assert runner.run(task, "acme", job.id) == "JOB_STATE_COMPLETED"
        assert calls == [1, 2, 3]  # one run, three attempts
        # Each wait is at least the hint (not the 0.05-0.2 s backoff), with the record QUEUED meanwhile.
        assert [state for _, state in waits] == [pb.JOB_STATE_QUEUED] * 2 and min(w for w, _ in waits) >= 7.0
        assert runner.jobs.get("acme", job.id).attempts == 3

        # Bounded: a service that stays busy ends the job FAILED with its status after max_retries waits.
        monkeypatch.setattr(runner, "_make", lambda *a: (_ for _ in ()).throw(busy))
        stuck, _ = runner.jobs.create("acme", request)
        task.job_id = stuck.id
        waits.clear()
        assert runner.run(task, "acme", stuck.id) == "JOB_STATE_FAILED"
        assert len(waits) == task.max_retries
        failed = runner.jobs.get("acme", stuck.id)
        assert failed.attempts == task.max_retries + 1 and failed.error.code == 8

        # A limit the request itself breaks (no hint) is final: FAILED with RESOURCE_EXHAUSTED, no retry.
        too_big = ResourceExhausted("batch of 99 is over the limit", reason="BATCH_TOO_LARGE")
        monkeypatch.setattr(runner, "_make", lambda *a: (_ for _ in ()).throw(too_big))
        other, _ = runner.jobs.create("acme", request)
        task.job_id = other.id
        waits.clear()
        assert runner.run(task, "acme", other.id) == "JOB_STATE_FAILED" and waits == []
        failed = runner.jobs.get("acme", other.id)
        assert failed.error.code == 8 and failed.error.detail.reason == "BATCH_TOO_LARGE"


def test_a_job_cancelled_while_it_waits_for_its_retry_ends_cancelled_without_another_attempt(monkeypatch) -> None:
    with RedisServer(RedisSettings()) as redis_server:
        runner = JobRunner(_settings(redis_url=redis_server.url))
        calls: list[int] = []
        monkeypatch.setattr(runner, "_make", lambda task, job, attempt, started: calls.append(attempt) or
                            (_ for _ in ()).throw(Unavailable("denoiser down")))  # fmt: skip
        job, _ = runner.jobs.create("acme", pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"]))
        task = _FakeTask()
        task.job_id = job.id
        _waits(runner, monkeypatch, then=lambda n: runner.jobs.request_cancel("acme", job.id))
        assert runner.run(task, "acme", job.id) == "JOB_STATE_CANCELLED"
        assert calls == [1] and runner.jobs.get("acme", job.id).state == pb.JOB_STATE_CANCELLED


def test_the_wait_before_a_retry_outlasts_a_redis_killed_and_restarted(tmp_path) -> None:
    # The real wait: the job's run sleeps through a Redis that is killed and started again on its data (the
    # cancel-flag checks fail quietly meanwhile), then carries on: the next attempt completes the job.
    # appendfsync always: a kill -9 loses no write (with everysec the requeue could be lost, and the attempt rerun)
    settings = RedisSettings(data_dir=tmp_path / "redis", appendfsync="always")
    redis_server = RedisServer(settings)
    redis_server.__enter__()
    try:
        runner = JobRunner(_settings(redis_url=redis_server.url, job_retry_backoff_seconds=3.0))
        calls: list[int] = []

        def make(task, job, attempt, started):
            calls.append(attempt)
            if attempt == 1:
                raise Unavailable("denoiser down")
            return []

        runner._make = make
        job, _ = runner.jobs.create("acme", pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"]))

        flags = redis.Redis.from_url(redis_server.url, socket_connect_timeout=0.5)

        class Task(_FakeTask):
            def cancelled(self) -> bool:  # as KinemaTask's: a read of the cancel flag in Redis
                return bool(flags.exists(f"kinema:cancel:{job.id}"))

        ended: list[str] = []
        started = time.monotonic()
        worker = threading.Thread(target=lambda: ended.append(runner.run(Task(), "acme", job.id)))
        worker.start()
        deadline = time.monotonic() + 10
        while runner.jobs.get("acme", job.id).state != pb.JOB_STATE_QUEUED and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_group(redis_server.pid, signal.SIGKILL)
        time.sleep(1.0)
        redis_server = RedisServer(redis_server.resolved_settings)
        redis_server.__enter__()
        worker.join(timeout=30)
        assert ended == ["JOB_STATE_COMPLETED"] and calls == [1, 2]
        assert 1.5 <= time.monotonic() - started < 20  # waited 1.5-3 s (backoff 3, jittered), no visibility timeout
        assert runner.jobs.get("acme", job.id).attempts == 2
    finally:
        redis_server.stop()


@pytest.mark.slow
def test_a_job_waiting_for_its_retry_when_redis_is_killed_goes_on_once_redis_is_back(tmp_path) -> None:
    # The orchestrator's job worker (as the stack runs it) with its model services down: every attempt meets
    # UNAVAILABLE. While the job waits for its first retry, redis-server is killed -9 and started again on its data.
    # The job's run goes on and ends FAILED after its last retry, seconds later. A retry by Celery countdown message
    # was dropped with the broker connection and came back only after the visibility timeout (6 h here).
    from kinema.jobs.celery_app import CeleryWorker, WorkerSettings, make_celery
    from kinema.orchestration.jobs import JobStore
    from kinema.orchestration.worker import enqueue
    from kinema.processes import free_ports
    from kinema.rpc.process import REPO, free_port

    port = free_ports("127.0.0.1", 1)[0]
    settings = RedisSettings(port=port, data_dir=tmp_path / "redis", appendfsync="always")  # no write lost to the kill
    first, again, url = (
        RedisServer(settings, log_path=tmp_path / "redis.log"),
        RedisServer(settings),
        f"redis://127.0.0.1:{port}/0",
    )
    down = {f"KINEMA_{cap}_URL": f"127.0.0.1:{free_port()}" for cap in ("TEXT_ENCODER", "DENOISER", "AUTOENCODER")}
    env = down | {"KINEMA_ARTIFACTS": (tmp_path / "artifacts").as_uri(), "KINEMA_REDIS_URL": url,
                  "KINEMA_JOB_MAX_RETRIES": "2", "KINEMA_JOB_MAX_ATTEMPTS": "3",
                  "KINEMA_JOB_RETRY_BACKOFF_SECONDS": "4", "OMP_NUM_THREADS": "1"}  # fmt: skip
    worker_settings = WorkerSettings(app="services.orchestrator.worker:app", broker_url=url, backend_url=url,
                                     pythonpath=(REPO,), env=env, startup_timeout=90.0)  # fmt: skip
    try:
        with first, CeleryWorker(worker_settings, log_path=tmp_path / "worker.log") as worker:
            store, client = JobStore(url), make_celery(url, url)
            try:
                job, _ = store.create("acme", pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"], steps=2))
                enqueue(client, job)
                deadline = time.monotonic() + 60
                while (record := store.get("acme", job.id)).state != pb.JOB_STATE_QUEUED or record.attempts != 1:
                    assert time.monotonic() < deadline, "the first attempt's failure not within 60 s"
                    time.sleep(0.02)
                kill_group(first.pid, signal.SIGKILL)  # the job now waits 2-4 s for its first retry
                time.sleep(1.0)
                again.start()
                again.wait_ready()
                deadline = time.monotonic() + 60
                while (record := store.get("acme", job.id)).state == pb.JOB_STATE_QUEUED:
                    assert time.monotonic() < deadline, "the job stayed QUEUED after Redis came back"
                    time.sleep(0.1)
                ended = store.get("acme", job.id)
                while ended.state == pb.JOB_STATE_RUNNING or ended.state == pb.JOB_STATE_QUEUED:
                    assert time.monotonic() < deadline, f"the job did not end: {pb.JobState.Name(ended.state)}"
                    time.sleep(0.1)
                    ended = store.get("acme", job.id)
                assert ended.state == pb.JOB_STATE_FAILED and ended.attempts == 3 and ended.error.code == 14
                assert worker.poll() is None
            finally:
                store.close()
                client.close()
    finally:
        again.stop()
