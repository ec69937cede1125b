"""Celery over a real redis-server, with real worker processes running tests/jobs/celery_tasks.py."""

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.exceptions import TaskRevokedError

from kinema.errors import InvalidInput, Unavailable
from kinema.jobs.broker import BrokerConnection
from kinema.jobs.celery_app import (
    PROGRESS,
    CeleryWorker,
    WorkerSettings,
    _one_torch_thread,
    cancel,
    make_celery,
    redis_errors_as_unavailable,
)
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.processes import free_ports, group_alive, group_members, kill_group

TASKS = Path(__file__).resolve().parent  # celery_tasks.py imports from here in the worker


def wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:g} s")
        time.sleep(0.02)


def worker_settings(server: RedisServer, **kwargs) -> WorkerSettings:
    return WorkerSettings(
        app="celery_tasks:app", broker_url=server.url, backend_url=server.url, pythonpath=(TASKS,), **kwargs
    )


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(log_path=tmp_path_factory.mktemp("redis") / "redis.log") as server:
        yield server


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with CeleryWorker(worker_settings(redis_server, pool="threads", concurrency=2), log_path=log) as w:
        yield w


@pytest.fixture(scope="module")
def client(redis_server: RedisServer) -> Iterator[Celery]:
    app = make_celery(redis_server.url, redis_server.url)
    yield app
    app.close()


@dataclass
class Counter:
    """A Redis key a job increments on each run; call it to read the count."""

    db: redis.Redis
    key: str

    def __call__(self) -> int:
        return int(self.db.get(self.key) or 0)


@pytest.fixture
def counter(redis_server: RedisServer) -> Counter:
    return Counter(redis.Redis.from_url(redis_server.url), f"runs-{uuid.uuid4().hex}")


# -- configuration ---------------------------------------------------------------------------------


def test_make_celery_speaks_json_only_and_acks_late():
    app = make_celery("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0", visibility_timeout=120)
    c = app.conf
    assert c.accept_content == ["json"] and c.result_accept_content == ["json"]
    assert c.task_serializer == c.result_serializer == "json"
    assert c.task_acks_late and c.task_reject_on_worker_lost and c.worker_prefetch_multiplier == 1
    assert c.task_track_started and c.result_extended and c.broker_connection_retry_on_startup
    assert c.broker_connection_max_retries is None  # a worker waits for Redis as long as it takes
    assert c.broker_transport_options["visibility_timeout"] == 120
    assert c.worker_pool == "threads"
    assert isinstance(app.connection_for_write(), BrokerConnection)  # survives a lost connection (kinema.jobs.broker)
    assert make_celery(result_expires=60).conf.result_expires == 60


@pytest.mark.parametrize(
    "kwargs",
    [{"app": "no_colon"}, {"pool": "gevent"}, {"concurrency": 0}, {"pool": "solo", "concurrency": 2}, {"name": "a@b"}],
)
def test_worker_settings_reject_bad_values(kwargs):
    base = {"app": "m:app", "broker_url": "redis://x", "backend_url": "redis://x"}
    with pytest.raises(InvalidInput):
        WorkerSettings(**{**base, **kwargs})


def test_prefork_children_get_one_torch_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _one_torch_thread()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- jobs on a running worker ------------------------------------------------------------------------


def test_result_round_trip_with_extended_state(client, worker):
    result = client.send_task("kinema_test.add", (2, 3))
    assert result.get(timeout=10) == 5
    assert result.state == "SUCCESS"
    assert (result.name, result.args, result.worker, result.retries) == ("kinema_test.add", [2, 3], worker.node, 0)


def test_progress_is_visible_while_the_job_runs(client, worker):
    result = client.send_task("kinema_test.steps", (15, 0.05))
    seen = []
    while not result.ready():
        if result.state == PROGRESS:
            seen.append(result.info["done"])
        time.sleep(0.02)
    assert result.get(timeout=1) == 15
    assert len(set(seen)) >= 3 and seen == sorted(seen) and 0 <= seen[0] < seen[-1] <= 14
    assert result.info == 15  # PROGRESS meta gives way to the return value


def test_cooperative_cancel_stops_a_long_job(client, worker, counter):
    result = client.send_task("kinema_test.steps", (1000, 0.05, counter.key))  # 50 s if nobody stops it
    wait_for(lambda: result.state == PROGRESS, 10, "PROGRESS")
    cancel(client, result.id)
    wait_for(lambda: result.state == "REVOKED", 3, "REVOKED")
    with pytest.raises(TaskRevokedError, match="cancelled"):
        result.get(timeout=1)
    assert counter() == 1


def test_revoke_with_terminate_stops_a_long_job_on_the_threads_pool(client, worker):
    # A thread cannot be killed: the worker logs that terminate is not supported, but the job sees the revoke.
    result = client.send_task("kinema_test.steps", (1000, 0.05))
    wait_for(lambda: result.state == PROGRESS, 10, "PROGRESS")
    result.revoke(terminate=True)
    wait_for(lambda: result.state == "REVOKED", 3, "REVOKED")


def test_a_job_cancelled_in_the_queue_never_runs(client, worker, counter):
    task_id = str(uuid.uuid4())
    cancel(client, task_id)
    result = client.send_task("kinema_test.steps", (5, 0.01, counter.key), task_id=task_id)
    wait_for(lambda: result.state == "REVOKED", 5, "REVOKED")
    time.sleep(0.2)
    assert counter() == 0


def test_transient_errors_retry_then_succeed(client, worker, counter):
    result = client.send_task("kinema_test.flaky", (2, counter.key))
    assert result.get(timeout=10) == {"attempt": 3, "retries": 2}
    assert result.retries == 2


def test_transient_errors_retry_a_bounded_number_of_times_then_fail_with_the_reason(client, worker, counter):
    result = client.send_task("kinema_test.flaky", (10, counter.key))
    with pytest.raises(Unavailable, match=r"transient: the store is down \(attempt 3\)"):
        result.get(timeout=10)
    assert result.state == "FAILURE" and result.retries == 2
    time.sleep(0.3)
    assert counter() == 3  # the first run and max_retries=2 more, no further


# -- prefork, crashes, restarts ------------------------------------------------------------------------


@pytest.mark.slow
def test_prefork_terminate_kills_a_job_that_never_checks_and_stop_leaves_no_process(
    redis_server, client, counter, tmp_path
):
    settings = worker_settings(redis_server, pool="prefork", concurrency=1, queues=("prefork",))
    with CeleryWorker(settings, log_path=tmp_path / "worker.log") as w:
        blind = client.send_task("kinema_test.sleep_blind", (60, counter.key), queue="prefork")
        wait_for(lambda: blind.state == PROGRESS, 10, "PROGRESS")
        started = time.monotonic()
        blind.revoke(terminate=True)
        wait_for(lambda: blind.state == "REVOKED", 3, "REVOKED")
        assert time.monotonic() - started < 3
        # A prefork child never hears the revoke broadcast: only the flag in Redis stops this one.
        steps = client.send_task("kinema_test.steps", (1000, 0.05), queue="prefork")
        wait_for(lambda: steps.state == PROGRESS, 20, "PROGRESS (after the pool replaced the killed child)")
        cancel(client, steps.id)
        wait_for(lambda: steps.state == "REVOKED", 3, "REVOKED")
        assert counter() == 1  # the killed job did not come back
        members = group_members(w.pid)
        assert len(members) >= 2  # the main process and its pool child
    assert not group_alive(w.pid) and not any(Path(f"/proc/{pid}").exists() for pid in members)
    w.stop()  # idempotent


@pytest.mark.slow
def test_acks_late_a_killed_workers_job_is_redelivered_to_a_new_worker(tmp_path):
    with RedisServer() as server:
        client = make_celery(server.url, server.url)
        # The worker's app reads this: a job unacknowledged for 3 s goes back to the queue.
        settings = worker_settings(server, env={"KINEMA_TEST_VISIBILITY_TIMEOUT": "3"})
        runs = redis.Redis.from_url(server.url)
        try:
            first = CeleryWorker(settings, log_path=tmp_path / "first.log")
            with first:
                result = client.send_task("kinema_test.steps", (20, 0.05, "runs"))  # 1 s: well inside 3 s
                wait_for(lambda: result.state == PROGRESS, 10, "PROGRESS")
                first.kill()
                wait_for(lambda: first.poll() is not None, 5, "the worker's death")
            assert result.state == PROGRESS  # nobody finished it or acknowledged it
            with CeleryWorker(settings, log_path=tmp_path / "second.log") as second:
                assert result.get(timeout=20) == 20
                assert result.worker == second.node
            assert int(runs.get("runs")) == 2
        finally:
            client.close()


def test_queued_jobs_and_results_survive_a_redis_restart(tmp_path):
    settings = RedisSettings(data_dir=tmp_path / "data")
    with RedisServer(settings) as server:
        client = make_celery(server.url, server.url)
        done = str(uuid.uuid4())
        client.backend.store_result(done, {"video": "s3://bucket/key"}, "SUCCESS")
        queued = client.send_task("kinema_test.add", (4, 5), queue="later").id
        restart = server.resolved_settings
        client.close()
    with RedisServer(restart) as server:
        client = make_celery(server.url, server.url)
        try:
            assert client.AsyncResult(done).result == {"video": "s3://bucket/key"}
            with CeleryWorker(worker_settings(server, queues=("later",)), log_path=tmp_path / "worker.log"):
                assert client.AsyncResult(queued).get(timeout=10) == 9
        finally:
            client.close()


@pytest.mark.parametrize("pool", ["threads", pytest.param("prefork", marks=pytest.mark.slow)])
def test_worker_outlives_redis_killed_under_a_running_job(pool, tmp_path):
    # Concurrency 2: with a slot free the consumer sits in BRPOP when Redis dies, the state in which celery 5.7 /
    # kombu 5.7 used to exit ("Unrecoverable error: AttributeError(... 'hostname')", kinema.jobs.broker).
    settings = RedisSettings(port=free_ports("127.0.0.1", 1)[0], data_dir=tmp_path / "data")  # both on one port
    first = RedisServer(settings, log_path=tmp_path / "redis.log")
    again = RedisServer(settings, log_path=tmp_path / "redis-again.log")
    try:
        with first, CeleryWorker(worker_settings(first, pool=pool, concurrency=2), log_path=tmp_path / "w.log") as w:
            client = make_celery(first.url, first.url)
            runs = redis.Redis.from_url(first.url)
            try:
                running = client.send_task("kinema_test.sleep_blind", (4, "runs"))  # reads no Redis while it sleeps
                wait_for(lambda: running.state == PROGRESS, 10, "PROGRESS")
                kill_group(first.pid, signal.SIGKILL)
                wait_for(lambda: first.poll() is not None, 5, "redis-server's death")
                time.sleep(1.0)  # the worker notices, fails to reconnect, waits to try again
                again.start()
                again.wait_ready()
                assert client.send_task("kinema_test.add", (2, 3)).get(timeout=15) == 5
                assert running.get(timeout=15) == 4  # the job ran on through the outage
                assert w.poll() is None
                assert int(runs.get("runs")) == 1  # it was not handed back and run a second time
                # Its ack (which may come after its result) reached Redis: the broker does not hand it out again.
                wait_for(lambda: runs.hlen("unacked") == 0, 5, "the job's ack")
            finally:
                client.close()
    finally:
        again.stop()
    assert "Unrecoverable error" not in w.log_path.read_text()


@pytest.mark.slow
def test_redis_going_away_gives_a_clear_error_quickly(tmp_path):
    server = RedisServer()
    with server:
        client = make_celery(server.url, server.url)
        known = client.send_task("kinema_test.add", (1, 2), queue="nobody").id
    assert server.poll() is not None and not group_alive(server.pid)
    pending = client.AsyncResult(known)  # kept until Redis is back: a result dropped while subscribed unsubscribes
    actions = {
        "submit": lambda: client.send_task("kinema_test.add", (1, 2)),
        "state": lambda: pending.state,
        "get": lambda: pending.get(timeout=30),
    }
    try:
        for action, call in actions.items():
            started = time.monotonic()
            unreachable = r"job queue \(Redis at .*\) is unreachable: .*Connection refused"
            with pytest.raises(Unavailable, match=unreachable), redis_errors_as_unavailable(client):
                call()
            assert time.monotonic() - started < 6, action
        # Once Redis is back the same app works again, whatever Celery's "must be restarted" said.
        log = tmp_path / "worker.log"
        with RedisServer(server.resolved_settings) as again, CeleryWorker(worker_settings(again), log_path=log):
            assert client.send_task("kinema_test.add", (2, 2)).get(timeout=10) == 4
            pending.forget()
    finally:
        client.close()
    server.stop()  # idempotent


# -- launch failures ---------------------------------------------------------------------------------


def test_worker_that_cannot_import_its_app_fails_fast_with_the_reason(redis_server, tmp_path):
    settings = WorkerSettings(app="no_such_module:app", broker_url=redis_server.url, backend_url=redis_server.url)
    worker = CeleryWorker(settings, log_path=tmp_path / "worker.log")
    started = time.monotonic()
    reason = r"exited with status 2 before .*: ModuleNotFoundError: .*no_such_module"
    with pytest.raises(Unavailable, match=reason), worker:
        pass
    assert time.monotonic() - started < 15
    assert not group_alive(worker.pid)


def test_redis_fails_fast_with_the_reason_when_its_port_is_taken(redis_server):
    server = RedisServer(RedisSettings(port=redis_server.port))
    reason = r"exited with status 1 before it answered: Warning: Could not .*Address already in use; Failed listening"
    with pytest.raises(Unavailable, match=reason), server:
        pass
    assert not group_alive(server.pid)
