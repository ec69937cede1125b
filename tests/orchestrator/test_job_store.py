"""Job records over a real redis-server: every transition, tenancy, listing, retention, idempotency keys and an
outage of Redis. No worker and no model services here (tests/orchestrator/test_jobs.py has them)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from kinema.common.v1 import common_pb2
from kinema.errors import InvalidInput, NotFound, Unavailable
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.orchestration.jobs import AlreadyExists, JobStore, check_job_id, request_fingerprint
from kinema.orchestrator.v1 import orchestrator_pb2 as pb

Q, R, C, F, X = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED,
                 pb.JOB_STATE_CANCELLED)  # fmt: skip


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    with RedisServer(log_path=tmp_path_factory.mktemp("redis") / "redis.log") as server:
        yield server


@pytest.fixture
def store(redis_server):
    """A store with its own key prefix, so tests share the server but not their jobs."""
    jobs = JobStore(redis_server.url, max_attempts=3, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield jobs
    jobs.close()


def _request(prompt: str = "a cube", **kw) -> pb.PipelineRequest:
    return pb.PipelineRequest(pipeline="text_to_image", prompts=[prompt], seed=1, steps=2, **kw)


def _output(sha: str = "ab" * 32) -> pb.Output:
    return pb.Output(index=0, artifact=common_pb2.ArtifactRef(uri=f"s3://b/default/{sha}", sha256=sha), seed=1)


def test_a_job_runs_and_records_its_result_once(store) -> None:
    job, created = store.create("default", _request())
    assert created and job.state == Q and job.attempts == 0 and job.tenant == "default" and len(job.id) == 32
    assert store.get("default", job.id) == job and job.created_at.seconds > time.time() - 60
    running = store.start("default", job.id)
    assert running is not None and (running.state, running.attempts) == (R, 1) and running.started_at.seconds
    store.progress("default", job.id, 1, 1, 2, 0.5)
    store.progress("default", job.id, 7, 2, 2, 0.6)  # not the running attempt: ignored
    assert (store.get("default", job.id).progress.step, store.get("default", job.id).progress.total) == (1, 2)
    done, recorded = store.complete("default", job.id, [_output()])
    assert recorded and done.state == C and list(done.outputs) == [_output()] and done.progress.step == 2
    assert done.finished_at.seconds and not done.HasField("error")
    # A second run of the same job (a redelivery, a retry that raced) changes nothing.
    again, recorded = store.complete("default", job.id, [_output("cd" * 32)])
    assert not recorded and again == done and store.get("default", job.id) == done
    assert store.start("default", job.id) is None and store.get("default", job.id) == done


def test_another_tenants_job_is_not_found(store) -> None:
    job, _ = store.create("acme", _request())
    with pytest.raises(NotFound) as info:
        store.get("default", job.id)
    assert (info.value.reason, info.value.field) == ("JOB_NOT_FOUND", "id")
    with pytest.raises(NotFound):
        store.request_cancel("default", job.id)
    assert store.get("acme", job.id).state == Q  # the other tenant's cancel did nothing
    assert store.list("default").jobs == [] and [j.id for j in store.list("acme").jobs] == [job.id]


@pytest.mark.parametrize("bad", ["", "a" * 65, "a:b", "../x", "a b"])
def test_malformed_ids_are_invalid(store, bad) -> None:
    with pytest.raises(InvalidInput) as info:
        store.get("default", bad)
    assert info.value.field == "id"
    assert check_job_id("A-z_09") == "A-z_09"


def test_cancel_a_queued_job_ends_it_and_a_running_one_asks_the_worker(store) -> None:
    queued, _ = store.create("default", _request())
    cancelled = store.request_cancel("default", queued.id)
    assert (cancelled.state, cancelled.cancel_requested, cancelled.attempts) == (X, True, 0)
    assert store.start("default", queued.id) is None  # its message, should it still arrive, does not run it
    assert store.request_cancel("default", queued.id) == cancelled  # idempotent

    running, _ = store.create("default", _request())
    store.start("default", running.id)
    asked = store.request_cancel("default", running.id)
    assert (asked.state, asked.cancel_requested) == (R, True)
    assert store.cancelled("default", running.id).state == X
    assert store.complete("default", running.id, [_output()]) == (store.get("default", running.id), False)
    assert not store.get("default", running.id).outputs

    # A retry waiting in the queue that gets a cancel is cancelled instead of queued again.
    retried, _ = store.create("default", _request())
    store.start("default", retried.id)
    store.request_cancel("default", retried.id)
    assert store.requeue("default", retried.id, 1).state == X


def test_failures_and_the_attempt_limit(store) -> None:
    job, _ = store.create("default", _request())
    for attempt in (1, 2, 3):
        assert store.start("default", job.id).attempts == attempt
        assert store.requeue("default", job.id, attempt).state == Q
    assert store.start("default", job.id) is None  # max_attempts=3 starts were made
    failed = store.get("default", job.id)
    assert failed.state == F and failed.error.detail.reason == "TOO_MANY_ATTEMPTS" and failed.error.code == 14

    other, _ = store.create("default", _request())
    store.start("default", other.id)
    error = pb.JobError(code=3, message="width: bad", detail=common_pb2.ErrorDetail(field="width"))
    assert store.fail("default", other.id, 2, error) is not None  # a stale attempt's failure: not recorded
    assert store.get("default", other.id).state == R
    assert store.fail("default", other.id, 1, error).error == error


def test_list_pages_newest_first_and_filters_by_state(store) -> None:
    ids = [store.create("default", _request(f"p{i}"))[0].id for i in range(5)]
    store.start("default", ids[1])
    store.request_cancel("default", ids[3])
    page = store.list("default", page_size=2)
    assert [j.id for j in page.jobs] == ids[::-1][:2] and page.next_page_token
    page2 = store.list("default", page_size=2, page_token=page.next_page_token)
    page3 = store.list("default", page_size=2, page_token=page2.next_page_token)
    assert [j.id for j in page2.jobs + page3.jobs] == ids[::-1][2:] and not page3.next_page_token
    assert [j.id for j in store.list("default", state=Q).jobs] == [ids[4], ids[2], ids[0]]
    assert [j.id for j in store.list("default", state=R).jobs] == [ids[1]]
    assert [j.id for j in store.list("default", state=X).jobs] == [ids[3]]
    assert len(store.list("default").jobs) == 5 and not store.list("default").next_page_token
    assert len(store.list("default", page_size=5000).jobs) == 5  # more than 1000 counts as 1000
    bad = [
        {"page_size": -1},
        {"state": 99},
        {"page_token": "not a token"},
        {"page_token": page.next_page_token, "state": Q},  # issued for another filter
    ]
    for kwargs in bad:
        with pytest.raises(InvalidInput) as info:
            store.list("default", **kwargs)
        assert info.value.field in ("page_size", "state", "page_token")


def test_finished_jobs_expire_and_leave_the_listing(redis_server) -> None:
    store = JobStore(redis_server.url, retention_seconds=1, prefix=f"t{uuid.uuid4().hex[:8]}")
    done, _ = store.create("default", _request())
    live, _ = store.create("default", _request())
    store.request_cancel("default", done.id)
    time.sleep(1.5)
    with pytest.raises(NotFound):
        store.get("default", done.id)
    assert [j.id for j in store.list("default").jobs] == [live.id]
    assert store.redis.zcard(store._index("default")) == 1  # the expired job's index entry went too
    assert store.redis.zcard(store._index("default", X)) == 0


def test_idempotency_keys(store) -> None:
    first, created = store.create("default", _request(), "key-1", request_fingerprint(_request()))
    again, created_again = store.create("default", _request(), "key-1", request_fingerprint(_request()))
    assert created and not created_again and again == first
    with pytest.raises(AlreadyExists) as info:
        store.create("default", _request("other"), "key-1", request_fingerprint(_request("other")))
    assert info.value.reason == "IDEMPOTENCY_KEY_REUSED" and info.value.metadata["job_id"] == first.id
    other_tenant, created = store.create("acme", _request(), "key-1", request_fingerprint(_request()))
    assert created and other_tenant.id != first.id  # keys are per tenant
    store.delete("default", first.id)  # an enqueue that failed: key and job go together
    assert store.create("default", _request(), "key-1", request_fingerprint(_request()))[1]
    with pytest.raises(InvalidInput):
        store.create("default", _request(), "\n")


def test_watchers_hear_every_change(store) -> None:
    job, _ = store.create("default", _request())

    async def watch() -> list[bool]:
        async with store.events("default", job.id) as events:
            quiet = await events.wait(0.05)
            await asyncio.to_thread(store.start, "default", job.id)
            await asyncio.to_thread(store.progress, "default", job.id, 1, 1, 2, 0.1)
            heard = await events.wait(5)
            drained = await events.wait(0.05)  # both changes were taken by the first wait
            await store.aclose()
            return [quiet, heard, drained]

    assert asyncio.run(watch()) == [False, True, False]


def test_redis_down_is_unavailable_and_the_store_recovers(tmp_path) -> None:
    server = RedisServer(RedisSettings(data_dir=tmp_path / "data"))
    with server:
        store = JobStore(server.url)
        job, _ = store.create("default", _request())
    calls = {
        "get": lambda: store.get("default", job.id),
        "create": lambda: store.create("default", _request()),
        "list": lambda: store.list("default"),
        "cancel": lambda: store.request_cancel("default", job.id),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            call()
        assert time.monotonic() - started < 3, name
        assert info.value.reason == "JOB_STORE_UNAVAILABLE" and "KINEMA_REDIS_URL" in str(info.value)
        assert f"Redis at redis://127.0.0.1:{server.port}/0" in str(info.value)
    with RedisServer(server.resolved_settings):
        assert store.get("default", job.id) == job  # kept on disk, and the same client reconnects
    store.close()
