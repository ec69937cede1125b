"""Durable jobs: their records in Redis and every change a job goes through.

A job's record is the `kinema.orchestrator.v1.Job` message itself, so any orchestrator (a restarted one too) and
any worker read the same state. Keys, all under `kinema:` (a tenant never contains ':'):

    kinema:job:<tenant>:<id>         hash: "job" (the Job as proto3 JSON), "fingerprint" (sha256 of the request as
                                     submitted, for idempotency keys), "updated" (ISO time of the last change)
    kinema:jobs:<tenant>             sorted set of "<created µs, 16 digits>:<id>", all scored 0 so that Redis orders
    kinema:jobs:<tenant>:<STATE>     them by member: ListJobs' indexes, newest first with ZREVRANGEBYLEX
    kinema:job-key:<tenant>:<key>    the id of the job an idempotency key created
    kinema:job-events:<tenant>:<id>  pub/sub channel: one message per change, which WatchJob waits on

Every change is one optimistic transaction (WATCH the hash, read, decide, MULTI/EXEC) that also moves the job
between state indexes and publishes the change, so two writers (a worker finishing, a CancelJob) never both win:
a terminal state is final, and `complete` records outputs only on the way from RUNNING to COMPLETED, once. A
finished job's record expires after the retention time; index entries of expired jobs are dropped when a listing
meets them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
from google.protobuf import json_format
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from kinema.common.v1 import common_pb2
from kinema.errors import AlreadyExists, InvalidInput, NotFound, Unavailable
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.storage.artifacts import check_tenant

TERMINAL = frozenset({pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})
STATES = tuple(v for v in pb.JobState.values() if v != pb.JOB_STATE_UNSPECIFIED)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEFAULT_RETENTION_SECONDS = 7 * 86400
DEFAULT_MAX_ATTEMPTS = 5
REDIS_URL_VAR = "KINEMA_REDIS_URL"  # named in the error a client gets while Redis is unreachable
UNAVAILABLE_CODE = 14  # google.rpc.Code UNAVAILABLE, as JobError.code carries it

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,128}")


def check_job_id(job_id: object) -> str:
    """`job_id` if it could be a job id (1-64 URL-safe characters), else InvalidInput naming field `id`."""
    if not job_id:
        raise InvalidInput("id is required: the Job.id SubmitJob returned", reason="MISSING", field="id")
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidInput(f"id must be 1-64 of A-Z, a-z, 0-9, '_', '-', got {job_id!r:.80}",
                           reason="INVALID_JOB_ID", field="id")  # fmt: skip
    return job_id


def check_idempotency_key(key: object) -> str:
    if key and (not isinstance(key, str) or not _IDEMPOTENCY_KEY.fullmatch(key)):
        raise InvalidInput("idempotency_key must be at most 128 printable ASCII characters",
                           reason="INVALID_IDEMPOTENCY_KEY", field="idempotency_key")  # fmt: skip
    return key or ""


def request_fingerprint(request: pb.PipelineRequest) -> str:
    """sha256 of the request's deterministic encoding: equal requests, equal fingerprints."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


@dataclass(frozen=True)
class Page:
    """One page of ListJobs."""

    jobs: list[pb.Job]
    next_page_token: str


def _now() -> datetime:
    return datetime.now(UTC)


def _encode(job: pb.Job) -> str:
    return json_format.MessageToJson(job, preserving_proto_field_name=True, indent=None)


def _decode(text: str) -> pb.Job:
    return json_format.Parse(text, pb.Job(), ignore_unknown_fields=True)  # a newer writer may add fields


def _member(job: pb.Job) -> str:
    micros = job.created_at.seconds * 1_000_000 + job.created_at.nanos // 1000
    return f"{micros:016d}:{job.id}"


def _page_token(after: str, state: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after, "state": state}).encode()).decode().rstrip("=")


def _read_page_token(token: str, state: int) -> str:
    """The index member a page starts after; InvalidInput for a token not issued for this filter."""
    if not token:
        return ""
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, issued_for = data["after"], data["state"]
        if not isinstance(after, str) or not isinstance(issued_for, int):
            raise ValueError
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise InvalidInput("page_token is not one ListJobs issued", reason="INVALID_PAGE_TOKEN",
                           field="page_token") from None  # fmt: skip
    if issued_for != state:
        raise InvalidInput(
            f"page_token was issued for another state filter than {pb.JobState.Name(state)}; list again from the "
            "first page",
            reason="PAGE_TOKEN_MISMATCH",
            field="page_token",
        )
    return after


class JobEvents:
    """A subscription to one job's changes (WatchJob): `wait` returns once something changed or time is up."""

    def __init__(self, pubsub: Any, errors: Callable[[], contextlib.AbstractContextManager]) -> None:
        self._pubsub, self._errors = pubsub, errors

    async def wait(self, timeout: float) -> bool:
        """True when at least one change was published (all pending ones are taken), False after `timeout` s."""
        with self._errors():
            got = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if got is None:
                return False
            while await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0) is not None:
                pass  # a slow reader gets the latest snapshot, not every step
        return True


class JobStore:
    """Job records in Redis: what the orchestrator and the workers read and change.

    Redis errors that mean "unreachable" raise `Unavailable` naming Redis and `KINEMA_REDIS_URL`; the client
    reconnects by itself once Redis answers again.
    """

    def __init__(
        self,
        url: str,
        *,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        prefix: str = "kinema",
    ) -> None:
        from kombu.utils.url import maybe_sanitize_url

        if retention_seconds < 1 or max_attempts < 1:
            raise InvalidInput("retention_seconds and max_attempts must be >= 1")
        self.url, self.retention_seconds, self.max_attempts, self.prefix = url, retention_seconds, max_attempts, prefix
        self.where = maybe_sanitize_url(url)  # no password in messages
        # Short timeouts and two quick retries: with Redis down a call fails in well under a second or two.
        self._options: dict[str, Any] = {"decode_responses": True, "socket_connect_timeout": 2.0,
                                         "socket_timeout": 5.0, "health_check_interval": 30}  # fmt: skip
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
        self.redis = redis.Redis.from_url(url, retry=retry, **self._options)
        self._async: redis.asyncio.Redis | None = None

    def close(self) -> None:
        self.redis.close()

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None

    # -- keys -------------------------------------------------------------------------------------

    def _job_key(self, tenant: str, job_id: str) -> str:
        return f"{self.prefix}:job:{tenant}:{job_id}"

    def _index(self, tenant: str, state: int = pb.JOB_STATE_UNSPECIFIED) -> str:
        base = f"{self.prefix}:jobs:{tenant}"
        return base if state == pb.JOB_STATE_UNSPECIFIED else f"{base}:{pb.JobState.Name(state)}"

    def _key_key(self, tenant: str, key: str) -> str:
        return f"{self.prefix}:job-key:{tenant}:{key}"

    def channel(self, tenant: str, job_id: str) -> str:
        return f"{self.prefix}:job-events:{tenant}:{job_id}"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Unavailable(
                f"the job store (Redis at {self.where}) is unreachable: {reason}; check that Redis runs and that "
                f"{REDIS_URL_VAR} points at it, then retry",
                reason="JOB_STORE_UNAVAILABLE",
            ) from e

    # -- reading ------------------------------------------------------------------------------------

    def get(self, tenant: str, job_id: str) -> pb.Job:
        """The job, or NotFound (also for another tenant's job and one past retention)."""
        check_tenant(tenant)
        check_job_id(job_id)
        with self._errors():
            raw = self.redis.hget(self._job_key(tenant, job_id), "job")
        if raw is None:
            raise NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND", field="id")
        return _decode(raw)

    def list(self, tenant: str, page_size: int = 0, page_token: str = "", state: int = 0) -> Page:
        """The tenant's jobs newest first (created_at, then id), optionally in one state, a page at a time."""
        check_tenant(tenant)
        if page_size < 0:
            raise InvalidInput(f"page_size must be >= 0, got {page_size}", reason="OUT_OF_RANGE", field="page_size")
        if state != pb.JOB_STATE_UNSPECIFIED and state not in STATES:
            raise InvalidInput(f"state {state} is not a JobState", reason="OUT_OF_RANGE", field="state")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _read_page_token(page_token, state)
        index = self._index(tenant, state)
        found: list[tuple[str, pb.Job]] = []
        cursor = f"({after}" if after else "+"
        with self._errors():
            while len(found) <= size:  # one more than a page tells whether there is a next one
                members = self.redis.zrevrangebylex(index, cursor, "-", start=0, num=size + 1 - len(found))
                if not members:
                    break
                cursor = f"({members[-1]}"
                pipe = self.redis.pipeline(transaction=False)
                for member in members:
                    pipe.hget(self._job_key(tenant, member.split(":", 1)[1]), "job")
                expired = []
                for member, raw in zip(members, pipe.execute(), strict=True):
                    if raw is None:
                        expired.append(member)
                        continue
                    job = _decode(raw)
                    if state == pb.JOB_STATE_UNSPECIFIED or job.state == state:  # else it moved since the read
                        found.append((member, job))
                if expired:
                    indexes = [self._index(tenant)] + [self._index(tenant, s) for s in STATES]
                    pipe = self.redis.pipeline(transaction=False)
                    for key in indexes:
                        pipe.zrem(key, *expired)
                    pipe.execute()
        more = len(found) > size
        token = _page_token(found[size - 1][0], state) if more else ""
        return Page([job for _, job in found[:size]], token)

    @contextlib.asynccontextmanager
    async def events(self, tenant: str, job_id: str) -> AsyncIterator[JobEvents]:
        """Subscribe to the job's changes (before reading it, so that no change falls between)."""
        if self._async is None:  # made in the running event loop, the server's only one
            retry = redis.asyncio.retry.Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
            self._async = redis.asyncio.Redis.from_url(self.url, retry=retry, **self._options)
        pubsub = self._async.pubsub()
        try:
            with self._errors():
                await pubsub.subscribe(self.channel(tenant, job_id))
            yield JobEvents(pubsub, self._errors)
        finally:
            with contextlib.suppress(redis.RedisError, OSError):
                await pubsub.aclose()

    # -- changing -----------------------------------------------------------------------------------

    def _update(self, tenant: str, job_id: str, change: Callable[[pb.Job], bool]) -> tuple[pb.Job | None, bool]:
        """Apply `change` (True: it changed the job) in one transaction; (the job after, whether it changed)."""
        key = self._job_key(tenant, job_id)

        def transaction(pipe: Any) -> tuple[pb.Job | None, bool]:
            raw = pipe.hget(key, "job")
            if raw is None:
                return None, False
            job = _decode(raw)
            before = job.state
            if not change(job):
                return job, False
            pipe.multi()
            self._write(pipe, job, before)
            return job, True

        with self._errors():
            return self.redis.transaction(transaction, key, value_from_callable=True)

    def _write(self, pipe: Any, job: pb.Job, before: int) -> None:
        """Queue the writes of `job` (whose state was `before`; UNSPECIFIED for a new job) on a MULTI pipeline."""
        key = self._job_key(job.tenant, job.id)
        pipe.hset(key, mapping={"job": _encode(job), "updated": _now().isoformat()})
        member = _member(job)
        if before == pb.JOB_STATE_UNSPECIFIED:
            pipe.zadd(self._index(job.tenant), {member: 0})
        if job.state != before:
            if before != pb.JOB_STATE_UNSPECIFIED:
                pipe.zrem(self._index(job.tenant, before), member)
            pipe.zadd(self._index(job.tenant, job.state), {member: 0})
        if job.state in TERMINAL:
            pipe.expire(key, self.retention_seconds)
            if job.idempotency_key:
                pipe.expire(self._key_key(job.tenant, job.idempotency_key), self.retention_seconds)
        pipe.publish(self.channel(job.tenant, job.id), pb.JobState.Name(job.state))

    def create(
        self, tenant: str, request: pb.PipelineRequest, idempotency_key: str = "", fingerprint: str = ""
    ) -> tuple[pb.Job, bool]:
        """A new QUEUED job, or (same key) the job the key created: (job, whether it is new).

        AlreadyExists when the key's job was submitted with another request (`fingerprint` differs).
        """
        check_tenant(tenant)
        check_idempotency_key(idempotency_key)
        job = pb.Job(id=uuid.uuid4().hex, state=pb.JOB_STATE_QUEUED, request=request, tenant=tenant,
                     idempotency_key=idempotency_key)  # fmt: skip
        job.created_at.FromDatetime(_now())
        key = self._key_key(tenant, idempotency_key) if idempotency_key else None

        def transaction(pipe: Any) -> tuple[pb.Job, bool]:
            if key is not None:
                existing = pipe.get(key)
                if existing:
                    raw, stored = pipe.hmget(self._job_key(tenant, existing), ["job", "fingerprint"])
                    if raw is not None:  # else the key outlived its job: make a new one
                        if stored != fingerprint:
                            raise AlreadyExists(
                                f"idempotency_key {idempotency_key!r} was used for job {existing} with a different "
                                "request; use a new key for a new request",
                                reason="IDEMPOTENCY_KEY_REUSED",
                                field="idempotency_key",
                                metadata={"job_id": existing},
                            )
                        return _decode(raw), False
            pipe.multi()
            if key is not None:
                pipe.set(key, job.id)
            pipe.hset(self._job_key(tenant, job.id), "fingerprint", fingerprint)
            self._write(pipe, job, pb.JOB_STATE_UNSPECIFIED)
            return job, True

        with self._errors():
            return self.redis.transaction(transaction, *([key] if key else []), value_from_callable=True)

    def delete(self, tenant: str, job_id: str) -> None:
        """Remove a job without a trace: undoes a `create` whose enqueueing failed."""
        key = self._job_key(tenant, job_id)
        with self._errors():
            raw = self.redis.hget(key, "job")
            if raw is None:
                return
            job = _decode(raw)
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(key)
            for index in [self._index(tenant)] + [self._index(tenant, s) for s in STATES]:
                pipe.zrem(index, _member(job))
            if job.idempotency_key:
                pipe.delete(self._key_key(tenant, job.idempotency_key))
            pipe.execute()

    def request_cancel(self, tenant: str, job_id: str) -> pb.Job:
        """CancelJob's change: a QUEUED job is CANCELLED at once, a RUNNING one gets cancel_requested (the worker
        stops it), a terminal one is left as it is. NotFound as for `get`."""
        check_tenant(tenant)
        check_job_id(job_id)

        def change(job: pb.Job) -> bool:
            if job.state in TERMINAL:
                return False
            job.cancel_requested = True
            if job.state == pb.JOB_STATE_QUEUED:
                _finish(job, pb.JOB_STATE_CANCELLED)
            return True

        job, _ = self._update(tenant, job_id, change)
        if job is None:
            raise NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND", field="id")
        return job

    # -- what workers change --------------------------------------------------------------------------

    def start(self, tenant: str, job_id: str) -> pb.Job | None:
        """A worker takes the job: RUNNING with one more attempt, or None when it must not run (gone, finished,
        cancelled, or out of attempts, which ends it FAILED)."""

        def change(job: pb.Job) -> bool:
            if job.state in TERMINAL:
                return False
            if job.cancel_requested:
                _finish(job, pb.JOB_STATE_CANCELLED)
            elif job.attempts >= self.max_attempts:
                job.error.CopyFrom(
                    pb.JobError(
                        code=UNAVAILABLE_CODE,
                        message=f"the job started {job.attempts} times without finishing (the limit); submit it again",
                        detail=common_pb2.ErrorDetail(reason="TOO_MANY_ATTEMPTS",
                                                      metadata={"attempts": str(job.attempts)}),
                    )
                )  # fmt: skip
                _finish(job, pb.JOB_STATE_FAILED)
            else:
                job.state = pb.JOB_STATE_RUNNING
                job.attempts += 1
                job.started_at.FromDatetime(_now())
                job.ClearField("progress")
            return True

        job, changed = self._update(tenant, job_id, change)
        return job if changed and job is not None and job.state == pb.JOB_STATE_RUNNING else None

    def progress(self, tenant: str, job_id: str, attempt: int, step: int, total: int, elapsed: float) -> None:
        """Record the progress of attempt `attempt` (ignored once another attempt runs or the job ended)."""

        def change(job: pb.Job) -> bool:
            if job.state != pb.JOB_STATE_RUNNING or job.attempts != attempt:
                return False
            job.progress.CopyFrom(common_pb2.Progress(step=step, total=total, elapsed_seconds=elapsed))
            return True

        self._update(tenant, job_id, change)

    def requeue(self, tenant: str, job_id: str, attempt: int) -> pb.Job | None:
        """Attempt `attempt` failed transiently and the job waits for a retry: QUEUED again (CANCELLED if a cancel
        came meanwhile). The job after, or None when it was not this attempt's to change."""

        def change(job: pb.Job) -> bool:
            if job.state != pb.JOB_STATE_RUNNING or job.attempts != attempt:
                return False
            if job.cancel_requested:
                _finish(job, pb.JOB_STATE_CANCELLED)
            else:
                job.state = pb.JOB_STATE_QUEUED
                job.ClearField("progress")
            return True

        job, changed = self._update(tenant, job_id, change)
        return job if changed else None

    def complete(self, tenant: str, job_id: str, outputs: list[pb.Output]) -> tuple[pb.Job | None, bool]:
        """COMPLETED with `outputs`, only from RUNNING: a job records its result once. (job, whether this call did)."""

        def change(job: pb.Job) -> bool:
            if job.state != pb.JOB_STATE_RUNNING:
                return False
            del job.outputs[:]
            job.outputs.extend(outputs)
            if job.HasField("progress"):
                job.progress.step = job.progress.total
            _finish(job, pb.JOB_STATE_COMPLETED)
            return True

        return self._update(tenant, job_id, change)

    def fail(self, tenant: str, job_id: str, attempt: int, error: pb.JobError) -> pb.Job | None:
        """FAILED with `error`, if attempt `attempt` is still the job's running one."""

        def change(job: pb.Job) -> bool:
            if job.state != pb.JOB_STATE_RUNNING or job.attempts != attempt:
                return False
            job.error.CopyFrom(error)
            _finish(job, pb.JOB_STATE_FAILED)
            return True

        return self._update(tenant, job_id, change)[0]

    def cancelled(self, tenant: str, job_id: str) -> pb.Job | None:
        """A worker saw the job's cancel: CANCELLED, if it is still live."""

        def change(job: pb.Job) -> bool:
            if job.state in TERMINAL:
                return False
            job.cancel_requested = True
            _finish(job, pb.JOB_STATE_CANCELLED)
            return True

        return self._update(tenant, job_id, change)[0]


def _finish(job: pb.Job, state: int) -> None:
    job.state = state
    job.finished_at.FromDatetime(_now())
    if state != pb.JOB_STATE_COMPLETED:
        del job.outputs[:]
    if state != pb.JOB_STATE_FAILED:
        job.ClearField("error")


__all__ = [
    "TERMINAL",
    "AlreadyExists",
    "JobEvents",
    "JobStore",
    "Page",
    "check_idempotency_key",
    "check_job_id",
    "request_fingerprint",
]
