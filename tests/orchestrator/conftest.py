"""The orchestrator as its own process (`python -m services.orchestrator`) over the session's real model services
(`triton`, `services` in tests/conftest.py), with a local-folder artifact store; and, for jobs, a real S3 server,
redis-server and Celery worker (`python -m celery -A services.orchestrator.worker:app worker`). The S3 server
(`job_s3`) is in tests/conftest.py, shared with tests/client."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from pathlib import Path

import grpc
import pytest

from kinema.jobs.celery_app import CeleryWorker, WorkerSettings
from kinema.orchestrator.v1 import orchestrator_pb2_grpc
from kinema.rpc.process import REPO, ServiceProcess, free_port
from kinema.storage.s3server import S3Server

WORKER_APP = "services.orchestrator.worker:app"


def start_orchestrator(log_dir: Path, artifacts: Path, addresses: dict[str, str], **extra: str) -> ServiceProcess:
    """An orchestrator over the model services at `addresses` (capability -> host:port), artifacts in a local folder;
    `extra`: more KINEMA_* settings (a Redis for jobs, limits)."""
    env = {f"KINEMA_{cap.upper()}_URL": address for cap, address in addresses.items()}
    return ServiceProcess("orchestrator", log_dir, KINEMA_ARTIFACTS=artifacts.as_uri(), **env, **extra).start()


@pytest.fixture(scope="session")
def orchestrator(services, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("orchestrator")
    proc = start_orchestrator(root, root / "artifacts", {name: s.address for name, s in services.items()})
    proc.artifacts = root / "artifacts"
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def lonely_orchestrator(tmp_path_factory: pytest.TempPathFactory):
    """An orchestrator whose model services are all down (nothing listens on their ports)."""
    root = tmp_path_factory.mktemp("lonely")
    addresses = {name: f"127.0.0.1:{free_port()}" for name in ("text_encoder", "denoiser", "autoencoder")}
    proc = start_orchestrator(root, root / "artifacts", addresses)
    proc.artifacts = root / "artifacts"
    try:
        yield proc
    finally:
        proc.stop()


def stub_of(proc: ServiceProcess):
    channel = grpc.insecure_channel(proc.address)
    return channel, orchestrator_pb2_grpc.OrchestratorStub(channel)


def model_calls(service: ServiceProcess) -> float:
    """Denoiser network evaluations so far (as tests/services read them)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith('kinema_model_seconds_count{backend="triton",model="denoiser"}'):
            return float(line.split()[-1])
    return 0.0


# -- jobs -----------------------------------------------------------------------------------------


def jobs_env(addresses: Mapping[str, str], s3: S3Server, redis_url: str, bucket: str, **extra: str) -> dict[str, str]:
    """The `KINEMA_*` environment an orchestrator and its job workers share."""
    env = {f"KINEMA_{cap.upper()}_URL": address for cap, address in addresses.items()}
    env |= {"KINEMA_ARTIFACTS": f"s3://{bucket}?endpoint={s3.endpoint}", "KINEMA_REDIS_URL": redis_url}
    env |= {"KINEMA_S3_ACCESS_KEY": s3.access_key, "KINEMA_S3_SECRET_KEY": s3.secret_key}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def start_job_worker(log_dir: Path, env: Mapping[str, str], concurrency: int = 1) -> CeleryWorker:
    """A Celery worker process running the orchestrator's job task (threads pool), ready for jobs."""
    url = env["KINEMA_REDIS_URL"]
    settings = WorkerSettings(app=WORKER_APP, broker_url=url, backend_url=url, concurrency=concurrency,
                              pythonpath=(REPO,), env=env, startup_timeout=60.0)  # fmt: skip
    worker = CeleryWorker(settings, log_path=log_dir / f"worker-{free_port()}.log")
    worker.start()
    try:
        worker.wait_ready()
    except BaseException:
        worker.stop()
        raise
    return worker
