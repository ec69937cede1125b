"""The Celery side of jobs: the app, the task that runs one job, and how the orchestrator enqueues one.

A job's message carries only (tenant, job id); the request, with its seed fixed at submit, is read from the job's
record (`kinema.orchestration.jobs`). The task runs the same pipeline adapter (`kinema.orchestration.pipelines`),
capability clients and output storage (`kinema.orchestration.outputs`) Generate runs, so a job and a Generate call
with the same request store the same artifact. Along the way:

- progress: every sampling step is written to the record, which publishes it for WatchJob;
- cancellation: CancelJob sets the Celery cancel flag and revokes (`kinema.jobs.celery_app.cancel`); the sampling
  callback checks the flag each step and raises, which cancels the denoiser's `Sample` call (its loop stops within
  a step); nothing is stored after a cancel;
- retries: `Unavailable` (a model service or the artifact store down), or a model service refusing the call for load
  (`ResourceExhausted` with a retry hint, kinema.rpc.admission), puts the job back to QUEUED and retries it after a
  jittered exponential wait (at least the hint), at most `job_max_retries` times, within the same run: the message
  stays unacknowledged meanwhile, as while the job runs, so a Redis restart does not strand it (`_wait_to_retry`);
  any other error ends it FAILED with
  the status a Generate call would have ended with (an unexpected one says only "internal error" and the job id);
- the end of a job (COMPLETED with its stored outputs, FAILED, CANCELLED) is written to the record again and again,
  with backoff, while Redis is unreachable, for at most `job_record_retry_seconds`: a job that finishes during a
  Redis outage ends in its state once Redis is back, instead of reading RUNNING until the broker redelivers it.
  If Redis stays away longer, the message is not acknowledged and the broker hands it out again later;
- idempotency: delivery is at least once (`acks_late`), so a job may run again (a retry, a lost worker's job handed
  to another). A rerun reproduces the same bytes (fixed seed), which the content-addressed store does not write
  again, and the record takes outputs only on its way from RUNNING to COMPLETED, once; a record already finished
  makes a redelivered message a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from celery import Celery
from celery.signals import task_revoked

from kinema.errors import KinemaError, ResourceExhausted, Unavailable
from kinema.jobs.celery_app import KinemaTask, job_retried, make_celery
from kinema.orchestration.capabilities import RemoteCapabilities
from kinema.orchestration.inputs import NO_INPUTS, resolve_inputs
from kinema.orchestration.jobs import JobStore
from kinema.orchestration.outputs import store_output
from kinema.orchestration.pipelines import REGISTRY, Registry
from kinema.orchestration.settings import ENV_VARS, OrchestratorSettings
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.rpc.logs import RequestContext, bind_request
from kinema.rpc.status import error_detail, to_status
from kinema.rpc.tls import internal_credentials
from kinema.storage.artifacts import ArtifactStore, store_from_uri

_LOGGER = logging.getLogger(__name__)

TASK_NAME = "kinema.orchestrator.run_job"
SERVICE = "kinema.orchestrator.v1.Orchestrator"  # what the job's log lines and service calls name as their origin
MAX_RETRY_WAIT = 60.0
RECORD_RETRY_WAIT = (0.25, 5.0)  # first and longest wait (s) between two tries of a job's final record write
T = TypeVar("T")


class JobCancelled(Exception):
    """Raised in the sampling callback once the job was cancelled; it cancels the denoiser's call."""


def retry_wait(retries: int, backoff: float) -> float:
    """Seconds before retry number `retries` + 1: 0.5-1 x min(60, backoff * 2^retries) ("equal jitter")."""
    return min(MAX_RETRY_WAIT, backoff * 2**retries) * random.uniform(0.5, 1.0)


def job_store(settings: OrchestratorSettings) -> JobStore:
    """The job records on the settings' Redis, with their retention and attempt limit."""
    return JobStore(
        settings.redis_url, retention_seconds=settings.job_retention_seconds, max_attempts=settings.job_max_attempts
    )


def job_error(exc: BaseException, job_id: str) -> pb.JobError:
    """What `exc` ends the job with: the status it would end a Generate call with; the job id is the request id."""
    status = to_status(exc, job_id)
    error = pb.JobError(code=status.code.value[0], message=status.details)
    if isinstance(exc, KinemaError):
        error.detail.CopyFrom(error_detail(exc, job_id))
    else:
        error.detail.metadata["request_id"] = job_id
    return error


class JobRunner:
    """Runs jobs in a worker process; its clients and store are made on first use (after a prefork fork)."""

    def __init__(self, settings: OrchestratorSettings, registry: Registry = REGISTRY) -> None:
        self.settings, self.registry = settings, registry
        self.jobs = job_store(settings)
        self._lock = threading.Lock()
        self._capabilities: RemoteCapabilities | None = None
        self._store: ArtifactStore | None = None
        self._credentials = internal_credentials(settings.service)  # mTLS to the services if set; read at start

    def _resources(self) -> tuple[RemoteCapabilities, ArtifactStore]:
        with self._lock:
            if self._capabilities is None or self._store is None:
                s = self.settings
                self._store = store_from_uri(s.artifacts, s.s3_access_key or None, s.s3_secret_key or None)
                self._capabilities = RemoteCapabilities(s.addresses, self._credentials)
            return self._capabilities, self._store

    @staticmethod
    def _cancelled(task: KinemaTask) -> bool:
        try:
            return task.cancelled()
        except Exception:  # Redis unreachable for a moment: carry on, the next step asks again
            _LOGGER.warning("could not read the job's cancel flag", exc_info=True)
            return False

    def run(self, task: KinemaTask, tenant: str, job_id: str) -> str:
        """Run the job if its record says it should run, and again after a transient error, waiting in this run
        (`_wait_to_retry`); the name of the state it ended in (Celery's result)."""
        retries = task.request.retries  # 0 unless a message from before in-run retries (a Celery retry) came back
        while True:
            ended, wait = self._attempt(task, tenant, job_id, retries)
            if wait is None:
                return ended
            self._wait_to_retry(task, wait)
            retries += 1

    def _attempt(self, task: KinemaTask, tenant: str, job_id: str, retries: int) -> tuple[str, float | None]:
        """One attempt: (the state the job ended in, None), or ("", seconds to wait) when it goes back to QUEUED."""
        job = self._record("start", lambda: self.jobs.start(tenant, job_id))  # a retry's wait may end in an outage
        if job is None:  # gone, already finished (a redelivery), cancelled, or out of attempts
            with contextlib.suppress(KinemaError):
                return pb.JobState.Name(self.jobs.get(tenant, job_id).state), None
            return "GONE", None
        attempt = job.attempts
        started = time.monotonic()
        with bind_request(RequestContext(job_id, SERVICE, "RunJob", started)):
            _LOGGER.info("job started", extra={"tenant": tenant, "attempt": attempt, "pipeline": job.request.pipeline})
            try:
                outputs = self._make(task, job, attempt, started)
            except JobCancelled:
                self._record("cancel", lambda: self.jobs.cancelled(tenant, job_id))
                _LOGGER.info("job cancelled", extra={"tenant": tenant, "attempt": attempt})
                return pb.JobState.Name(pb.JOB_STATE_CANCELLED), None
            except (Unavailable, ResourceExhausted) as e:
                if isinstance(e, ResourceExhausted) and e.retry_after is None:  # a limit the request itself breaks
                    return self._fail(tenant, job_id, attempt, e), None
                if retries < task.max_retries and attempt < self.jobs.max_attempts:
                    again = self._record("retry", lambda: self.jobs.requeue(tenant, job_id, attempt))
                    if again is not None and again.state == pb.JOB_STATE_QUEUED:
                        wait = retry_wait(retries, self.settings.job_retry_backoff_seconds)
                        wait = max(wait, e.retry_after or 0.0)  # a busy service's hint
                        _LOGGER.warning("job will be retried", extra={"error": str(e), "wait_seconds": round(wait, 3)})
                        job_retried.send(sender=task, request=task.request, reason=e)
                        return "", wait
                    return pb.JobState.Name(again.state if again is not None else pb.JOB_STATE_UNSPECIFIED), None
                return self._fail(tenant, job_id, attempt, e), None
            except Exception as e:
                return self._fail(tenant, job_id, attempt, e), None
            after, recorded = self._record("completion", lambda: self.jobs.complete(tenant, job_id, outputs))
            _LOGGER.info("job finished", extra={"recorded": recorded, "outputs": len(outputs)})
            return pb.JobState.Name(after.state if after is not None else pb.JOB_STATE_UNSPECIFIED), None

    def _wait_to_retry(self, task: KinemaTask, seconds: float) -> None:
        """Sleep before the next attempt in this run, the job's message still unacknowledged, as while it runs.

        Not a Celery countdown retry: that sends a new message which the worker holds unacknowledged until its time
        comes, and drops when the broker connection goes; kombu cannot hand it back while Redis is down, so after a
        Redis restart such a job read QUEUED until the visibility timeout (6 h by default). Waiting here, the job goes
        on once its time comes, through a Redis outage as a running job does. The price: the wait (at most
        MAX_RETRY_WAIT) holds a worker slot. A cancel ends the wait early; the next attempt then finds the record
        CANCELLED and stops.
        """
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._cancelled(task):
                return
            time.sleep(min(1.0, left))

    def _fail(self, tenant: str, job_id: str, attempt: int, exc: Exception) -> str:
        error = job_error(exc, job_id)
        if isinstance(exc, KinemaError):
            _LOGGER.warning("job failed", extra={"error": str(exc), "reason": exc.reason, "field": exc.field})
        else:  # the traceback goes to the worker log only; the record says "internal error" and the job id
            _LOGGER.error("job failed with an unexpected error", exc_info=exc)
        self._record("failure", lambda: self.jobs.fail(tenant, job_id, attempt, error))
        return pb.JobState.Name(pb.JOB_STATE_FAILED)

    def _record(self, what: str, write: Callable[[], T]) -> T:
        """`write()` of a job's start, retry or end, tried again with backoff while Redis is unreachable
        (`Unavailable`), for at most `job_record_retry_seconds`; then the last `Unavailable` propagates and the message
        stays unacked."""
        deadline = time.monotonic() + self.settings.job_record_retry_seconds
        wait, longest = RECORD_RETRY_WAIT
        while True:
            try:
                return write()
            except Unavailable as e:
                if time.monotonic() + wait > deadline:
                    raise
                _LOGGER.warning("could not record the job's %s; trying again", what,
                                extra={"error": str(e).splitlines()[0], "wait_seconds": wait})  # fmt: skip
                time.sleep(wait)
                wait = min(longest, 2 * wait)

    def _make(self, task: KinemaTask, job: pb.Job, attempt: int, started: float) -> list[pb.Output]:
        """Run the pipeline and store its outputs; raises JobCancelled once the job was cancelled."""
        tenant, job_id = job.tenant, job.id
        pipeline = self.registry.get(job.request.pipeline)
        prepared = pipeline.prepare(job.request, self.settings.service.max_batch)  # the seed was fixed at submit
        capabilities, store = self._resources()

        def callback(i: int, n: int, x: object) -> None:
            if self._cancelled(task):
                raise JobCancelled  # the remote denoiser cancels its Sample call: the service's loop stops
            try:
                self.jobs.progress(tenant, job_id, attempt, i + 1, n, time.monotonic() - started)
            except Unavailable:  # a missed progress report is not worth the job
                _LOGGER.warning("could not record progress", exc_info=True)

        if self._cancelled(task):
            raise JobCancelled
        inputs = NO_INPUTS  # the request's input artifacts, looked up again: one may have gone since the submit
        if job.request.inputs:
            inputs = resolve_inputs(store, tenant, job.request, pipeline.info(), self.settings.media_limits)
        bound = capabilities.bind(pipeline.capabilities, job.request.models, self.settings.job_timeout_seconds)
        made = pipeline.run(prepared, replace(bound, inputs=inputs), callback)
        if self._cancelled(task):
            raise JobCancelled  # stored only once every output is made, so a cancelled job stores nothing
        return [store_output(store, m, pipeline.name, tenant) for m in made]


class JobTask(KinemaTask):
    """KinemaTask whose cancel before the start also ends the job's record CANCELLED."""

    runner: JobRunner

    def __call__(self, tenant: str, job_id: str) -> Any:
        if JobRunner._cancelled(self):
            with contextlib.suppress(KinemaError):
                self.runner.jobs.cancelled(tenant, job_id)
        return super().__call__(tenant, job_id)  # KinemaTask ends a cancelled job as REVOKED


def make_job_app(settings: OrchestratorSettings, registry: Registry = REGISTRY) -> Celery:
    """The Celery app of the orchestrator and its workers, with the job task registered."""
    if not settings.jobs_enabled:
        raise ValueError(f"{ENV_VARS['redis_url']} must be set (redis://host:port/db) to run jobs")
    app = make_celery(
        settings.celery_broker_url,
        settings.redis_url,
        main="kinema-orchestrator",
        visibility_timeout=settings.job_visibility_timeout_seconds,
        result_expires=settings.job_retention_seconds,
    )
    runner = JobRunner(settings, registry)

    @app.task(bind=True, base=JobTask, name=TASK_NAME, runner=runner, max_retries=settings.job_max_retries,
              autoretry_for=())  # fmt: skip
    def run_job(self: JobTask, tenant: str, job_id: str) -> str:
        return self.runner.run(self, tenant, job_id)

    def revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
        """A revoke that reached this worker before the job started: the worker drops it, the record says so."""
        args = getattr(request, "args", None) or ()
        if getattr(sender, "name", None) == TASK_NAME and getattr(sender, "app", None) is app and len(args) == 2:
            with contextlib.suppress(KinemaError):
                runner.jobs.cancelled(*args)

    task_revoked.connect(revoked, weak=False)
    from kinema.orchestration.distillation import register_distillation  # they build on this module
    from kinema.orchestration.fitting import register_fitting
    from kinema.orchestration.model_jobs import job_queues

    app.conf.task_queues = job_queues(app.conf.task_default_queue)  # a worker takes them all unless told `--queues`
    register_distillation(app, settings)  # on its own queue, `distill`
    register_fitting(app, settings)  # IIN fittings, on `fit`
    return app


def enqueue(app: Celery, job: pb.Job) -> None:
    """Send `job` to the workers; the Celery task id is the job id.

    `ignore_result`: the job's record is its result. Celery's own result entries would repeat it, and asking for
    them makes the sending process subscribe to every job's result channel.
    """
    app.send_task(TASK_NAME, args=(job.tenant, job.id), task_id=job.id, ignore_result=True)


__all__ = ["TASK_NAME", "JobCancelled", "JobRunner", "enqueue", "job_error", "job_store", "make_job_app", "retry_wait"]
