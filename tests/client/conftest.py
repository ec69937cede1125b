"""A Kinema server for the client and CLI tests: the orchestrator with durable jobs over the session's real model
services (`triton`, `services`) and S3 server (`job_s3`) of tests/conftest.py, with a redis-server and a Celery worker
of its own, started as tests/orchestrator starts them (`jobs_env`, `start_job_worker`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.orchestrator.conftest import jobs_env, start_job_worker

from kinema.client import KinemaClient
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.rpc.process import ServiceProcess

BUCKET = "kinema-client"


@pytest.fixture(scope="session")
def client_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    root = tmp_path_factory.mktemp("client-redis")
    with RedisServer(RedisSettings(data_dir=root / "data"), log_path=root / "redis.log") as server:
        yield server


@pytest.fixture(scope="session")
def server(services, job_s3, client_redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The orchestrator, serving Generate and jobs, and one worker running one job at a time."""
    root = tmp_path_factory.mktemp("client-server")
    env = jobs_env({name: s.address for name, s in services.items()}, job_s3, client_redis.url, BUCKET)
    worker = start_job_worker(root, env, concurrency=1)
    proc = ServiceProcess("orchestrator", root, **env)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
        worker.stop()


@pytest.fixture
def kinema(server) -> Iterator[KinemaClient]:
    with KinemaClient(server.address, timeout=120) as client:
        yield client
