"""The job task's pieces in process: the Celery app it registers on, retry waits, the errors a job records, and how
its end is recorded across a Redis outage (a real redis-server, stopped and started again on its data)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from kinema.errors import InvalidInput, NotFound, Unavailable
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.orchestration.settings import OrchestratorSettings
from kinema.orchestration.worker import TASK_NAME, JobRunner, job_error, make_job_app, retry_wait
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
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


class _Retry(Exception):
    """What the fake task's `retry` raises, as Celery's raises its Retry."""


class _FakeTask:
    """The parts of a bound Celery task that JobRunner.run touches."""

    def __init__(self, retries: int = 0, max_retries: int = 3) -> None:
        self.request = type("Request", (), {"retries": retries})()
        self.max_retries = max_retries
        self.countdown: float | None = None

    def retry(self, exc: BaseException, countdown: float) -> _Retry:
        self.countdown = countdown
        return _Retry(exc)


def test_a_busy_model_service_puts_the_job_back_for_at_least_its_hint(tmp_path, monkeypatch) -> None:
    from kinema.errors import ResourceExhausted

    with RedisServer(RedisSettings()) as redis_server:
        runner = JobRunner(_settings(redis_url=redis_server.url, job_retry_backoff_seconds=0.1))
        request = pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"])
        busy = ResourceExhausted("denoiser is busy", reason="SERVER_BUSY", retry_after=7.0)
        monkeypatch.setattr(runner, "_make", lambda *a: (_ for _ in ()).throw(busy))
        job, _ = runner.jobs.create("acme", request)
        task = _FakeTask()
        with pytest.raises(_Retry):
            runner.run(task, "acme", job.id)
        assert task.countdown >= 7.0  # the hint, not the 0.05-0.1 s backoff
        assert runner.jobs.get("acme", job.id).state == pb.JOB_STATE_QUEUED

        # A limit the request itself breaks (no hint) is final: FAILED with RESOURCE_EXHAUSTED, no retry.
        too_big = ResourceExhausted("batch of 99 is over the limit", reason="BATCH_TOO_LARGE")
        monkeypatch.setattr(runner, "_make", lambda *a: (_ for _ in ()).throw(too_big))
        other, _ = runner.jobs.create("acme", request)
        assert runner.run(_FakeTask(), "acme", other.id) == "JOB_STATE_FAILED"
        failed = runner.jobs.get("acme", other.id)
        assert failed.error.code == 8 and failed.error.detail.reason == "BATCH_TOO_LARGE"
