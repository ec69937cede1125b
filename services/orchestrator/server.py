"""Orchestrator service: Kinema's front door (kinema.orchestrator.v1).

`Generate` checks the request with the named pipeline's adapter (`kinema.orchestration.pipelines`), runs it in a
worker thread over the model services' gRPC clients (`kinema.orchestration.capabilities`), streams the
denoiser's progress and stores every output in the artifact store with its provenance. A client cancel sets a
flag the progress callback raises on, which cancels the denoiser's `Sample` call within one step; nothing is
stored after that. Jobs and uploads are not implemented yet: those RPCs answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import grpc

from kinema.common.v1 import common_pb2
from kinema.errors import InvalidInput
from kinema.orchestration.capabilities import CAPABILITIES, RemoteCapabilities
from kinema.orchestration.pipelines import REGISTRY, PipelineOutput, Registry
from kinema.orchestration.settings import OrchestratorSettings
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from kinema.rpc.server import Binding, KinemaServer, make_server, remaining_seconds
from kinema.rpc.settings import ServiceSettings
from kinema.storage.artifacts import (
    DEFAULT_TENANT,
    MAX_EXPIRY,
    Artifact,
    ArtifactStore,
    Provenance,
    check_sha256,
    check_tenant,
    store_from_uri,
)

SERVICE = "kinema.orchestrator.v1.Orchestrator"
TENANT_KEY = "kinema-tenant"
MAX_BLOCKING_CALLS = 64  # worker threads for pipeline runs and store calls (as kinema.rpc.models)
T = TypeVar("T")


class _Stopped(Exception):
    """Raised inside a run's worker thread once its client went away."""


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's tenant: the `kinema-tenant` metadata, else "default"."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_KEY:
            try:
                return check_tenant(value)
            except InvalidInput as e:
                raise InvalidInput(str(e), reason=e.reason, field=TENANT_KEY) from None
    return DEFAULT_TENANT


def provenance_message(p: Provenance) -> pb.Provenance:
    """The wire form of a stored provenance; model names and versions come from the resolved `models` parameter."""
    msg = pb.Provenance(pipeline=p.pipeline, parent_sha256=list(p.parents))
    msg.parameters.update(dict(p.parameters))
    if p.seed is not None:
        msg.seed = p.seed
    refs = p.parameters.get("models") or {}
    for cap, sha in p.models.items():
        ref = refs.get(cap) or {}
        msg.models[cap].CopyFrom(common_pb2.ModelInfo(name=ref.get("name", ""), version=ref.get("version", ""),
                                                      sha256=sha))  # fmt: skip
    msg.created_at.FromDatetime(datetime.fromisoformat(p.created_utc).astimezone(UTC))
    return msg


def artifact_ref(a: Artifact) -> common_pb2.ArtifactRef:
    return common_pb2.ArtifactRef(uri=a.uri, sha256=a.sha256, media_type=a.media_type, size_bytes=a.size_bytes)


class OrchestratorServicer(pb_grpc.OrchestratorServicer):
    def __init__(
        self,
        settings: OrchestratorSettings,
        store: ArtifactStore,
        capabilities: RemoteCapabilities,
        registry: Registry = REGISTRY,
    ) -> None:
        self.settings, self.store, self.capabilities, self.registry = settings, store, capabilities, registry
        self._pool = ThreadPoolExecutor(MAX_BLOCKING_CALLS, thread_name_prefix="orchestrator-call")

    async def _run_blocking(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on the worker pool, with the request's context (its request id reaches the services)."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: ctx.run(fn, *args))

    def _signed(self, artifact: Artifact, ttl: int) -> tuple[str, datetime]:
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
        return self.store.presigned_url(artifact.sha256, artifact.tenant, timedelta(seconds=ttl)), expires_at

    def _store(self, made: PipelineOutput, pipeline: str, tenant: str) -> pb.Output:
        provenance = Provenance(pipeline=pipeline, parameters=made.parameters, seed=made.seed, models=made.models)
        artifact = self.store.put(made.data, made.media_type, provenance, tenant)
        url, expires_at = self._signed(artifact, self.settings.url_ttl_seconds)
        output = pb.Output(index=made.index, artifact=artifact_ref(artifact), presigned_url=url,
                           prompt_truncated=made.prompt_truncated)  # fmt: skip
        output.expires_at.FromDatetime(expires_at)
        if made.seed is not None:
            output.seed = made.seed
        if artifact.provenance is not None:  # bytes stored before keep their first provenance
            output.provenance.CopyFrom(provenance_message(artifact.provenance))
        return output

    async def Generate(self, request: pb.GenerateRequest, context):
        tenant = tenant_of(context)
        if request.preview_every < 0:
            raise InvalidInput("preview_every must be >= 0", reason="OUT_OF_RANGE", field="preview_every")
        if request.preview_every > 0:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "previews are not implemented yet; set preview_every 0")
        pipeline = self.registry.get(request.request.pipeline)
        prepared = pipeline.prepare(request.request, self.settings.service.max_batch)
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
                bound = self.capabilities.bind(pipeline.capabilities, request.request.models, timeout)
                made = pipeline.run(prepared, bound, callback)
                if stop.is_set():
                    raise _Stopped
                # Stored only once every output is made, so a failed or cancelled run stores nothing.
                return [self._store(m, pipeline.name, tenant) for m in made]
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
        wanted = [c for c in CAPABILITIES if not request.capability or c == request.capability]
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

    # -- not in this release --------------------------------------------------------------------

    async def _jobs_unimplemented(self, context, method: str) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{method}: durable jobs are not implemented yet; use Generate")  # fmt: skip

    async def SubmitJob(self, request, context):
        await self._jobs_unimplemented(context, "SubmitJob")

    async def GetJob(self, request, context):
        await self._jobs_unimplemented(context, "GetJob")

    async def WatchJob(self, request, context):
        await self._jobs_unimplemented(context, "WatchJob")

    async def CancelJob(self, request, context):
        await self._jobs_unimplemented(context, "CancelJob")

    async def ListJobs(self, request, context):
        await self._jobs_unimplemented(context, "ListJobs")

    async def UploadArtifact(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "UploadArtifact is not implemented yet; text_to_image needs no inputs")  # fmt: skip


def build_server(settings: ServiceSettings | OrchestratorSettings) -> KinemaServer:
    """The orchestrator's server; plain ServiceSettings (as `serve` passes) get the orchestrator's from the env."""
    if not isinstance(settings, OrchestratorSettings):
        settings = OrchestratorSettings.from_env(service=settings)
    store = store_from_uri(settings.artifacts, settings.s3_access_key or None, settings.s3_secret_key or None)
    servicer = OrchestratorServicer(settings, store, RemoteCapabilities(settings.addresses))
    binding = Binding(SERVICE, pb_grpc.add_OrchestratorServicer_to_server, servicer)
    return make_server(settings.service, [binding], "orchestrator")
