"""Orchestrator service: Kinema's front door (kinema.orchestrator.v1).

`Generate` checks the request with the named pipeline's adapter (`kinema.orchestration.pipelines`), runs it in a
worker thread over the model services' gRPC clients (`kinema.orchestration.capabilities`), streams the
denoiser's progress and stores every output in the artifact store with its provenance. A client cancel sets a
flag the progress callback raises on, which cancels the denoiser's `Sample` call within one step; nothing is
stored after that.

Jobs (SubmitJob, GetJob, WatchJob, CancelJob, ListJobs) are the same runs made durable: the request is checked as
Generate checks it, recorded in Redis (`kinema.orchestration.jobs`) and run by a Celery worker
(`kinema.orchestration.worker`, started with `python -m services.orchestrator.worker`). Without KINEMA_REDIS_URL
they answer UNIMPLEMENTED.

Admission control (docs/serving.md#admission-control): each Generate holds one of the server's KINEMA_MAX_IN_FLIGHT
places while it runs, and SubmitJob is refused while KINEMA_MAX_QUEUED_JOBS jobs wait for a worker; both refusals
are RESOURCE_EXHAUSTED with a retry hint. Every other RPC is cheap and never refused.

A request's `inputs` are artifacts of the caller's tenant, looked up before anything runs
(`kinema.orchestration.inputs`); `UploadArtifact` stores them (`kinema.orchestration.uploads`): the stream is
checked message by message, the bytes are checked to be a whole image of an accepted size, and only then stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from celery import Celery

from kinema.errors import InvalidInput, KinemaError, ResourceExhausted
from kinema.jobs.celery_app import cancel, queue_depth, redis_errors_as_unavailable
from kinema.orchestration.capabilities import RemoteCapabilities
from kinema.orchestration.inputs import NO_INPUTS, StoredInputs, resolve_inputs
from kinema.orchestration.jobs import (
    TERMINAL,
    AlreadyExists,
    JobStore,
    check_idempotency_key,
    check_job_id,
    request_fingerprint,
)
from kinema.orchestration.outputs import artifact_ref, provenance_message, signed, store_signed
from kinema.orchestration.pipelines import REGISTRY, Pipeline, Registry
from kinema.orchestration.settings import ENV_VARS, OrchestratorSettings
from kinema.orchestration.uploads import Upload, UploadLimits, accepted_media_types
from kinema.orchestration.worker import enqueue, job_store, make_job_app
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from kinema.pipelines.text_to_image import check_prompts
from kinema.rpc.auth import tenant_of
from kinema.rpc.logs import request_id as current_request_id
from kinema.rpc.server import Binding, KinemaServer, make_server, remaining_seconds
from kinema.rpc.settings import ServiceSettings
from kinema.rpc.status import ERROR_DETAIL_KEY, error_detail
from kinema.rpc.tls import internal_credentials
from kinema.storage.artifacts import (
    MAX_EXPIRY,
    Artifact,
    ArtifactStore,
    check_sha256,
    store_from_uri,
)

SERVICE = "kinema.orchestrator.v1.Orchestrator"
MAX_BLOCKING_CALLS = 64  # worker threads for pipeline runs and store calls (as kinema.rpc.models)
WATCH_POLL_SECONDS = 2.0  # WatchJob reads the job at least this often, should a change notice be lost
LIMITED = frozenset({"Generate"})  # the RPCs that hold one of the KINEMA_MAX_IN_FLIGHT places (kinema.rpc.admission)
# How long a client refused for a full job queue is asked to wait: the queue drains at the workers' pace, which
# the orchestrator does not know; a few seconds is short next to any job.
QUEUE_FULL_RETRY_SECONDS = 5.0
T = TypeVar("T")


class _Stopped(Exception):
    """Raised inside a run's worker thread once its client went away."""


class OrchestratorServicer(pb_grpc.OrchestratorServicer):
    def __init__(
        self,
        settings: OrchestratorSettings,
        store: ArtifactStore,
        capabilities: RemoteCapabilities,
        registry: Registry = REGISTRY,
        jobs: JobStore | None = None,
        job_app: Celery | None = None,
    ) -> None:
        self.settings, self.store, self.capabilities, self.registry = settings, store, capabilities, registry
        self.jobs, self.job_app = jobs, job_app
        self._pool = ThreadPoolExecutor(MAX_BLOCKING_CALLS, thread_name_prefix="orchestrator-call")

    async def _run_blocking(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on the worker pool, with the request's context (its request id reaches the services)."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: ctx.run(fn, *args))

    def _inputs(self, tenant: str, request: pb.PipelineRequest, pipeline: Pipeline) -> StoredInputs:
        """The request's input artifacts, each found in `tenant` with a media type the pipeline reads (blocking)."""
        if not request.inputs:
            return NO_INPUTS
        return resolve_inputs(self.store, tenant, request, pipeline.info(), self.settings.media_limits)

    def _prepare(self, pipeline: Pipeline, request: pb.PipelineRequest) -> Any:
        """`request` checked and with its defaults filled in by `pipeline` (no service calls); first, whichever the
        pipeline, its prompts against this server's KINEMA_MAX_PROMPT_CHARS."""
        check_prompts(request.prompts, self.settings.service.max_prompt_chars, request.negative_prompt)
        return pipeline.prepare(request, self.settings.service.max_batch)

    def _signed(self, artifact: Artifact, ttl: int) -> tuple[str, datetime]:
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
        return self.store.sign(artifact, timedelta(seconds=ttl)), expires_at  # `artifact`: just stat'ed

    async def Generate(self, request: pb.GenerateRequest, context):
        tenant = tenant_of(context)
        if request.preview_every < 0:
            raise InvalidInput("preview_every must be >= 0", reason="OUT_OF_RANGE", field="preview_every")
        if request.preview_every > 0:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "previews are not implemented yet; set preview_every 0")
        pipeline = self.registry.get(request.request.pipeline)
        prepared = self._prepare(pipeline, request.request)
        self.capabilities.require(pipeline.capabilities)  # a service this server lacks (KINEMA_DEPTH_URL unset)
        timeout = remaining_seconds(context, self.settings.service)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        started = time.monotonic()

        def callback(i: int, n: int, x: object) -> None:
            if stop.is_set():
                raise _Stopped  # the remote denoiser cancels its Sample call: the service's loop stops
            event = pb.GenerateResponse()
            event.progress.step, event.progress.total = i + 1, n
            event.progress.elapsed_seconds = time.monotonic() - started
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> list[pb.Output]:
            try:
                inputs = self._inputs(tenant, request.request, pipeline)
                bound = self.capabilities.bind(pipeline.capabilities, request.request.models, timeout)
                made = pipeline.run(prepared, replace(bound, inputs=inputs), callback)
                if stop.is_set():
                    raise _Stopped
                # Stored only once every output is made, so a failed or cancelled run stores nothing.
                ttl = self.settings.url_ttl_seconds
                return [store_signed(self.store, m, pipeline.name, tenant, ttl) for m in made]
            finally:
                loop.call_soon_threadsafe(events.put_nowait, None)

        task = asyncio.ensure_future(self._run_blocking(work))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a cancelled call's error goes unread
        try:
            while (event := await events.get()) is not None:
                yield event
            outputs = await task
            yield pb.GenerateResponse(result=pb.GenerateResult(outputs=outputs))
        finally:
            stop.set()  # client cancel or error: the run stops at its next step

    async def GetArtifact(self, request: pb.GetArtifactRequest, context) -> pb.GetArtifactResponse:
        tenant = tenant_of(context)
        sha256 = check_sha256(request.sha256)
        ttl = request.url_ttl_seconds or 3600
        if not 1 <= ttl <= MAX_EXPIRY.total_seconds():
            raise InvalidInput(f"url_ttl_seconds must be in 1..604800 (0: 3600), got {request.url_ttl_seconds}",
                               reason="OUT_OF_RANGE", field="url_ttl_seconds")  # fmt: skip

        def describe() -> pb.GetArtifactResponse:
            artifact = self.store.stat(sha256, tenant)  # NotFound for another tenant's artifact too
            url, expires_at = self._signed(artifact, ttl)
            reply = pb.GetArtifactResponse(artifact=artifact_ref(artifact), presigned_url=url)
            reply.expires_at.FromDatetime(expires_at)
            if artifact.provenance is not None:
                reply.provenance.CopyFrom(provenance_message(artifact.provenance))
            return reply

        return await self._run_blocking(describe)

    async def ListPipelines(self, request: pb.ListPipelinesRequest, context) -> pb.ListPipelinesResponse:
        return pb.ListPipelinesResponse(pipelines=self.registry.infos(request.name))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        wanted = [c for c in self.capabilities.listed if not request.capability or c == request.capability]
        timeout = min(self.settings.list_models_timeout_seconds, remaining_seconds(context, self.settings.service))

        def one(capability: str) -> pb.CapabilityModels:
            try:
                catalog = self.capabilities.catalog(capability, timeout)
            except Exception:  # any failure of one service: listed unavailable, the others still listed
                return pb.CapabilityModels(capability=capability, available=False)
            return pb.CapabilityModels(capability=capability, models=catalog.models,
                                       default_model=catalog.default_model, available=True)  # fmt: skip

        answers = await asyncio.gather(*(self._run_blocking(one, c) for c in wanted))
        return pb.ListModelsResponse(capabilities=answers)

    # -- jobs -----------------------------------------------------------------------------------------

    async def _job_backend(self, context) -> tuple[JobStore, Celery]:
        if self.jobs is None or self.job_app is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"durable jobs are off on this server: set {ENV_VARS['redis_url']} (redis://host:port/db) and run a "
                "worker (python -m services.orchestrator.worker); Generate works without them",
            )
        return self.jobs, self.job_app

    def _job_reply(self, job: pb.Job) -> pb.Job:
        """`job` as a response carries it: its outputs with freshly signed URLs."""
        if not job.outputs:
            return job
        reply = pb.Job()
        reply.CopyFrom(job)
        del reply.outputs[:]
        ttl = self.settings.url_ttl_seconds
        reply.outputs.extend(signed(self.store, o, job.tenant, ttl) for o in job.outputs)
        return reply

    def _resolved(self, request: pb.PipelineRequest, pipeline: Pipeline) -> pb.PipelineRequest:
        """The request a job records: its seed drawn now when the pipeline reads one and it is unset, so that a
        retried or restarted job reproduces its outputs (orchestrator.proto, PipelineRequest.seed)."""
        resolved = pb.PipelineRequest()
        resolved.CopyFrom(request)
        reads = {p.name for p in pipeline.info().parameters}
        if "seed" in reads and not resolved.HasField("seed"):
            resolved.seed = secrets.randbelow(pipeline.seed_limit - self.settings.service.max_batch)
        return resolved

    async def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.SubmitJobResponse:
        jobs, app = await self._job_backend(context)
        tenant = tenant_of(context)
        key = check_idempotency_key(request.idempotency_key)
        pipeline = self.registry.get(request.request.pipeline)
        resolved = self._resolved(request.request, pipeline)
        prepared = self._prepare(pipeline, resolved)  # Generate's checks, before queueing
        fingerprint = request_fingerprint(request.request)

        def submit() -> pb.Job:
            self.capabilities.require(pipeline.capabilities)  # a service this server lacks: refused, never queued
            inputs = self._inputs(tenant, resolved, pipeline)
            check_inputs = getattr(pipeline, "check_inputs", None)  # what a pipeline can check of its inputs' headers
            if inputs.artifacts and check_inputs is not None:
                check_inputs(prepared, inputs)
            job, created = jobs.create(tenant, resolved, key, fingerprint)
            if created:  # a resubmit with a used idempotency key returns its job, even with the queue full
                try:
                    with redis_errors_as_unavailable(app):
                        self._check_queue(app)
                        enqueue(app, job)
                except BaseException:
                    with contextlib.suppress(KinemaError):
                        jobs.delete(tenant, job.id)  # never a job no worker will ever see
                    raise
            return self._job_reply(job)

        try:
            job = await self._run_blocking(submit)
        except AlreadyExists as e:
            detail = error_detail(e, current_request_id() or "")
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e),
                                trailing_metadata=((ERROR_DETAIL_KEY, detail.SerializeToString()),))  # fmt: skip
        return pb.SubmitJobResponse(job=job)

    def _check_queue(self, app: Celery) -> None:
        """ResourceExhausted (JOB_QUEUE_FULL, with a retry hint) while `max_queued_jobs` jobs wait for a worker."""
        limit = self.settings.max_queued_jobs
        if not limit:
            return
        waiting = queue_depth(app)
        if waiting >= limit:
            var = ENV_VARS["max_queued_jobs"]
            raise ResourceExhausted(
                f"the job queue is full: {waiting} jobs wait for a worker, the limit is {limit} ({var}); the job was "
                f"not submitted. Retry in {QUEUE_FULL_RETRY_SECONDS:g} s or later; operators: add workers or raise "
                f"{var}",
                reason="JOB_QUEUE_FULL",
                metadata={"queued": str(waiting), "limit": str(limit), "setting": var},
                retry_after=QUEUE_FULL_RETRY_SECONDS,
            )

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        jobs, _ = await self._job_backend(context)
        tenant = tenant_of(context)
        job_id = check_job_id(request.id)
        return pb.GetJobResponse(job=await self._run_blocking(lambda: self._job_reply(jobs.get(tenant, job_id))))

    async def WatchJob(self, request: pb.WatchJobRequest, context):
        jobs, _ = await self._job_backend(context)
        tenant = tenant_of(context)
        job_id = check_job_id(request.id)
        async with jobs.events(tenant, job_id) as events:  # subscribed before the first read: no change is missed
            last = None
            while True:
                job = await self._run_blocking(jobs.get, tenant, job_id)
                if job != last:
                    yield pb.WatchJobResponse(job=await self._run_blocking(self._job_reply, job))
                    last = job
                if job.state in TERMINAL:
                    return
                await events.wait(WATCH_POLL_SECONDS)

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        jobs, app = await self._job_backend(context)
        tenant = tenant_of(context)
        job_id = check_job_id(request.id)

        def cancel_job() -> pb.Job:
            job = jobs.get(tenant, job_id)  # NotFound for another tenant's job: nothing is revoked for it
            if job.state in TERMINAL:
                return self._job_reply(job)
            with redis_errors_as_unavailable(app):
                cancel(app, job_id)  # the flag the sampling loop checks, and a revoke for a job still queued
            return self._job_reply(jobs.request_cancel(tenant, job_id))

        return pb.CancelJobResponse(job=await self._run_blocking(cancel_job))

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        jobs, _ = await self._job_backend(context)
        tenant = tenant_of(context)

        def page() -> pb.ListJobsResponse:
            found = jobs.list(tenant, request.page_size, request.page_token, request.state)
            return pb.ListJobsResponse(jobs=[self._job_reply(j) for j in found.jobs],
                                       next_page_token=found.next_page_token)  # fmt: skip

        return await self._run_blocking(page)

    # -- uploads --------------------------------------------------------------------------------------

    async def UploadArtifact(self, request_iterator, context) -> pb.UploadArtifactResponse:
        tenant = tenant_of(context)
        limits = UploadLimits(self.settings.upload_max_bytes, accepted_media_types(self.registry.infos()),
                              self.settings.media_limits)  # fmt: skip
        upload = Upload(limits)
        try:
            async for message in request_iterator:
                await self._run_blocking(upload.add, message)  # in order; a spooled file may write to disk
            artifact = await self._run_blocking(upload.store, self.store, tenant)
        finally:
            upload.close()
        return pb.UploadArtifactResponse(artifact=artifact_ref(artifact))


def build_server(settings: ServiceSettings | OrchestratorSettings) -> KinemaServer:
    """The orchestrator's server; plain ServiceSettings (as `serve` passes) get the orchestrator's from the env."""
    if not isinstance(settings, OrchestratorSettings):
        settings = OrchestratorSettings.from_env(service=settings)
    store = store_from_uri(settings.artifacts, settings.s3_access_key or None, settings.s3_secret_key or None)
    jobs, job_app = (job_store(settings), make_job_app(settings)) if settings.jobs_enabled else (None, None)
    capabilities = RemoteCapabilities(settings.addresses, internal_credentials(settings.service))  # mTLS if set
    servicer = OrchestratorServicer(settings, store, capabilities, jobs=jobs, job_app=job_app)
    binding = Binding(SERVICE, pb_grpc.add_OrchestratorServicer_to_server, servicer, limited=LIMITED)
    return make_server(settings.service, [binding], "orchestrator")
