"""The job task's pieces in process: the Celery app it registers on, retry waits, and the errors a job records."""

from __future__ import annotations

import random

import pytest

from kinema.errors import InvalidInput, NotFound, Unavailable
from kinema.orchestration.settings import OrchestratorSettings
from kinema.orchestration.worker import TASK_NAME, job_error, make_job_app, retry_wait
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
