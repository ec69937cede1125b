"""kinema.jobs.metrics: real Celery worker processes over a real redis-server serve their job metrics on /metrics.

Two workers: tests/jobs/metrics_tasks.py (the test tasks, labelled by task name), and the orchestrator's job worker
(`services.orchestrator.worker:app`, as the stack and the chart run it) whose jobs are labelled by their pipeline and
whose model services are down, so that a job is retried and then fails without Triton.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from kinema.jobs.celery_app import CeleryWorker, WorkerSettings, cancel, make_celery
from kinema.jobs.metrics import OUTCOMES, RunLabel, WorkerMetrics, outcome, serve_worker_metrics
from kinema.jobs.redis_server import RedisServer
from kinema.rpc.process import REPO, free_port
from kinema.rpc.settings import ServiceSettings

TASKS = Path(__file__).resolve().parent
JOB_WORKER_APP = "services.orchestrator.worker:app"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:g} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(log_path=tmp_path_factory.mktemp("redis") / "redis.log") as server:
        yield server


@pytest.fixture(scope="module")
def client(redis_server: RedisServer) -> Iterator[Celery]:
    app = make_celery(redis_server.url, redis_server.url)
    yield app
    app.close()


# -- without a worker ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "retval", "expected"),
    [
        ("SUCCESS", 5, "succeeded"),
        ("SUCCESS", "JOB_STATE_COMPLETED", "succeeded"),
        ("SUCCESS", "JOB_STATE_FAILED", "failed"),
        ("SUCCESS", "JOB_STATE_CANCELLED", "cancelled"),
        ("SUCCESS", "GONE", "skipped"),
        ("RETRY", None, "retried"),
        ("FAILURE", None, "failed"),
        ("IGNORED", None, "cancelled"),
        ("REJECTED", None, "failed"),
    ],
)
def test_outcome_of_a_run(state, retval, expected):
    assert outcome(state, retval) == expected and expected in OUTCOMES


def test_no_metrics_port_no_metrics():
    assert serve_worker_metrics(make_celery("redis://127.0.0.1:1/0"), ServiceSettings(metrics_port=0)) is None


def _one() -> int:
    return 1


def test_runs_of_another_app_are_not_counted():
    mine, other = Celery("mine"), Celery("other")
    task = other.task(name="t.other")(_one)
    metrics = WorkerMetrics(mine, label=lambda *_: RunLabel("p"))
    metrics.on_prerun(sender=task, task_id="x")
    metrics.on_postrun(sender=task, task_id="x", retval=1, state="SUCCESS")
    own = mine.task(name="t.mine")(_one)
    metrics.on_prerun(sender=own, task_id="y")
    assert metrics.in_progress.labels("p")._value.get() == 1
    metrics.on_postrun(sender=own, task_id="y", retval=1, state="SUCCESS")
    assert metrics.in_progress.labels("p")._value.get() == 0
    assert metrics.finished.labels("p", "succeeded")._value.get() == 1
    assert metrics.started.labels("p")._value.get() == 1


# -- a worker of the test tasks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks_worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    port = free_port()
    settings = WorkerSettings(app="metrics_tasks:app", broker_url=redis_server.url, backend_url=redis_server.url,
                              pythonpath=(TASKS,), concurrency=2, env={"KINEMA_METRICS_PORT": str(port)})  # fmt: skip
    with CeleryWorker(settings, log_path=tmp_path_factory.mktemp("worker") / "worker.log") as worker:
        worker.metrics_port = port
        yield worker


def test_a_worker_serves_started_finished_durations_and_in_progress_by_task(client, tasks_worker, redis_server):
    port = tasks_worker.metrics_port
    before = scrape(port)
    assert client.send_task("kinema_test.add", (2, 3)).get(timeout=20) == 5
    counter = f"runs-{uuid.uuid4().hex}"
    assert client.send_task("kinema_test.flaky", (1, counter)).get(timeout=20)["attempt"] == 2  # one retry
    long = client.send_task("kinema_test.steps", (400, 0.05))  # 20 s unless cancelled
    wait_for(lambda: value(scrape(port), "kinema_worker_jobs_in_progress", pipeline="kinema_test.steps") == 1, 20,
             "a running job in kinema_worker_jobs_in_progress")  # fmt: skip
    cancel(client, long.id)
    wait_for(lambda: long.state == "REVOKED", 20, "the cancel")

    def grew(name: str, **labels: str) -> float:
        return value(scrape(port), name, **labels) - value(before, name, **labels)

    wait_for(lambda: grew("kinema_worker_jobs_finished_total", pipeline="kinema_test.steps", outcome="cancelled") == 1,
             10, "the cancelled run's outcome")  # fmt: skip
    assert grew("kinema_worker_jobs_started_total", pipeline="kinema_test.add") == 1
    assert grew("kinema_worker_jobs_finished_total", pipeline="kinema_test.add", outcome="succeeded") == 1
    assert grew("kinema_worker_jobs_started_total", pipeline="kinema_test.flaky") == 2
    assert grew("kinema_worker_jobs_finished_total", pipeline="kinema_test.flaky", outcome="retried") == 1
    assert grew("kinema_worker_job_retries_total", pipeline="kinema_test.flaky") == 1
    assert grew("kinema_worker_jobs_finished_total", pipeline="kinema_test.flaky", outcome="succeeded") == 1
    assert grew("kinema_worker_job_seconds_count", pipeline="kinema_test.add", outcome="succeeded") == 1
    assert value(scrape(port), "kinema_worker_jobs_in_progress", pipeline="kinema_test.steps") == 0
    families = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for family, kind in [
        ("kinema_worker_jobs_started_total", "counter"),
        ("kinema_worker_jobs_finished_total", "counter"),
        ("kinema_worker_job_seconds", "histogram"),
        ("kinema_worker_job_retries_total", "counter"),
        ("kinema_worker_jobs_in_progress", "gauge"),
    ]:
        assert f"# TYPE {family} {kind}" in families


# -- the orchestrator's job worker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs_url(redis_server: RedisServer) -> str:
    """Another database of the same Redis: the test tasks' worker must not take the job worker's messages."""
    return redis_server.url.rsplit("/", 1)[0] + "/1"


@pytest.fixture(scope="module")
def job_worker(jobs_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    root = tmp_path_factory.mktemp("job-worker")
    port = free_port()
    down = {f"KINEMA_{cap}_URL": f"127.0.0.1:{free_port()}" for cap in ("TEXT_ENCODER", "DENOISER", "AUTOENCODER")}
    env = down | {"KINEMA_ARTIFACTS": (root / "artifacts").as_uri(), "KINEMA_REDIS_URL": jobs_url,
                  "KINEMA_METRICS_PORT": str(port), "KINEMA_JOB_MAX_RETRIES": "1",
                  "KINEMA_JOB_RETRY_BACKOFF_SECONDS": "0.05", "KINEMA_JOB_TIMEOUT_SECONDS": "10",
                  "OMP_NUM_THREADS": "1"}  # fmt: skip
    settings = WorkerSettings(app=JOB_WORKER_APP, broker_url=jobs_url, backend_url=jobs_url, pythonpath=(REPO,),
                              env=env, startup_timeout=90.0)  # fmt: skip
    with CeleryWorker(settings, log_path=root / "worker.log") as worker:
        worker.metrics_port = port
        yield worker


@pytest.mark.slow
def test_the_job_worker_labels_runs_by_pipeline_retries_then_fails_with_the_services_down(job_worker, jobs_url):
    from kinema.orchestration.jobs import JobStore
    from kinema.orchestration.worker import enqueue
    from kinema.orchestrator.v1 import orchestrator_pb2 as pb

    port = job_worker.metrics_port
    store, client = JobStore(jobs_url), make_celery(jobs_url, jobs_url)
    try:
        request = pb.PipelineRequest(pipeline="text_to_image", prompts=["a red cube"], seed=1, steps=2)
        job, _ = store.create("acme", request)
        enqueue(client, job)
        wait_for(lambda: store.get("acme", job.id).state == pb.JOB_STATE_FAILED, 60, "the job's failure")
        ended = store.get("acme", job.id)
        assert ended.attempts == 2 and ended.error.code == 14  # UNAVAILABLE, after one retry within the run

        # A job cancelled while queued: its run finds the record ended and changes nothing.
        cancelled, _ = store.create("acme", request)
        store.request_cancel("acme", cancelled.id)
        enqueue(client, cancelled)
        labels = {"pipeline": "text_to_image"}
        wait_for(lambda: value(scrape(port), "kinema_worker_jobs_finished_total", outcome="skipped", **labels) == 1,
                 30, "the skipped run")  # fmt: skip
    finally:
        store.close()
        client.close()
    samples = scrape(port)
    assert value(samples, "kinema_worker_jobs_started_total", **labels) == 2  # the failed run, the skipped one
    assert value(samples, "kinema_worker_job_retries_total", **labels) == 1
    assert value(samples, "kinema_worker_jobs_finished_total", outcome="retried", **labels) == 0
    assert value(samples, "kinema_worker_jobs_finished_total", outcome="failed", **labels) == 1
    assert value(samples, "kinema_worker_job_seconds_count", outcome="failed", **labels) == 1
    assert value(samples, "kinema_worker_jobs_in_progress", **labels) == 0
