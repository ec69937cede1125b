"""Distill service: few-step sampling with LADD students of the denoiser (Sample, ListModels), Triton or in-process.

A student is a denoiser-family model whose config carries `student_steps` and names its teacher
(`kinema.pipelines.student.StudentFacts`); `denoiser_4step` is the default, and the teacher itself is not one of
this service's models. `Sample` runs the library's few-step loop (`kinema.pipelines.local.LocalStudent`, the loop
embedded mode runs) in a worker thread, one network evaluation per step through the model runner (Triton by
default: the student is served as a denoiser network, so `kinema.rpc.denoising.RunnerNetwork` calls it, as the
denoiser service does).
Progress streams back as steps finish; a client cancel or an expired deadline stops the loop at the next step.

Distillations (`StartDistillation`, `GetDistillation`, `CancelDistillation`) are jobs: this service checks the request
and the teacher (a denoiser model its runner serves that is no student), records the job, claims the teacher and
queues it (`kinema.orchestration.distillation.DistillJobs`); the orchestrator's job worker trains, stores and loads the
student into Triton, after which `ListModels` lists it. Without KINEMA_REDIS_URL they answer UNIMPLEMENTED. With the
artifact store too (KINEMA_ARTIFACTS), the service loads stored students Triton has dropped (a restart) back into it
every KINEMA_STUDENT_RESTORE_SECONDS (`kinema.orchestration.model_jobs.ModelRestorer`).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace

import grpc
import numpy as np
import torch

from kinema.common.v1 import common_pb2
from kinema.distill.v1 import distill_pb2 as pb
from kinema.distill.v1 import distill_pb2_grpc as pb_grpc
from kinema.errors import AlreadyExists, InvalidInput, NotFound, Unavailable
from kinema.inference.runner import ServedModel
from kinema.orchestration.distillation import (
    STUDENTS_KEY,
    DistillationSpec,
    DistillJobs,
    check_teacher,
    distillation_message,
    job_settings,
)
from kinema.orchestration.model_jobs import ModelRestorer
from kinema.pipelines.local import LocalStudent
from kinema.pipelines.student import StudentFacts, resolve_timesteps
from kinema.rpc import tensors
from kinema.rpc.auth import tenant_of
from kinema.rpc.denoising import RunnerNetwork, conditioning
from kinema.rpc.models import ModelFamily, build_model_server
from kinema.rpc.server import KinemaServer, remaining_seconds
from kinema.rpc.settings import ServiceSettings
from kinema.rpc.streaming import stream_steps

# The student consumes the teacher's Conditioning message and is served as the teacher's network: the denoiser
# service's decoding of one and its runner-backed network are reused as they are (distill.proto: student on teacher).

SERVICE = "kinema.distill.v1.Distill"
DEFAULT_MODEL = "denoiser_4step"
FAMILY = "denoiser"  # students are named as denoiser variants; only those with student_steps are this service's


def student_facts(served: ServedModel) -> StudentFacts:
    """The student facts of a served model; NOT_FOUND for a denoiser model that is not a student."""
    try:
        facts = StudentFacts.from_parameters(served.parameters)
    except ValueError as e:
        raise Unavailable(f"model {served.name!r} has a malformed config: {e}") from None
    if facts is None:
        raise NotFound(
            f"model {served.name!r} is not a distilled student (its config has no student_steps); ListModels shows "
            "the students this service serves",
            reason="MODEL_NOT_FOUND",
            field="model.name",
        )
    return facts


def student_info(served: ServedModel) -> common_pb2.ModelInfo:
    """ModelInfo of a student: the network's params (where the backend knows them), its teacher and schedule."""
    params = json.loads(served.params_json or "{}") | student_facts(served).params()
    return common_pb2.ModelInfo(name=served.name, version=served.version, sha256=served.sha256,
                                params_json=json.dumps(params, sort_keys=True))  # fmt: skip


def _noise(request: pb.SampleRequest, family: ModelFamily) -> torch.Tensor:
    noise = tensors.decode(request.noise, "noise", np.float32, ndim=4, writable=True)  # (B, C, h, w)
    family.check_batch(noise.shape[0], "noise")
    if min(noise.shape) == 0:
        raise InvalidInput(f"noise: expected (B, C, h, w) with every side > 0, got {noise.shape}",
                           reason="INVALID_SHAPE", field="noise")  # fmt: skip
    return torch.from_numpy(noise)


def _seeds(request: pb.SampleRequest, batch: int) -> list[int]:
    seeds = list(request.seeds)
    if seeds and len(seeds) != batch:
        raise InvalidInput(f"seeds: one per row, {batch}, got {len(seeds)}", reason="INVALID_SHAPE", field="seeds")
    if seeds and request.seed:
        raise InvalidInput("seed must be 0 when seeds are given (one per row)", reason="CONFLICT", field="seed")
    return seeds


class DistillServicer(pb_grpc.DistillServicer):
    def __init__(self, family: ModelFamily, jobs: DistillJobs | None = None) -> None:
        self.family = family
        self.jobs = jobs

    def _resolve(self, ref: common_pb2.ModelRef) -> tuple[str, str]:
        if ref.name == FAMILY:  # the family's own name is the teacher's, which ModelFamily would call "no denoiser"
            raise NotFound(f"model {ref.name!r} is the teacher, not a distilled student; ListModels shows the "
                           "students this service serves", reason="MODEL_NOT_FOUND", field="model.name")  # fmt: skip
        return self.family.resolve(ref)

    async def Sample(self, request: pb.SampleRequest, context):
        name, version = self._resolve(request.model)
        noise = _noise(request, self.family)
        cond = conditioning(request.cond, "cond")
        if cond.tokens.shape[0] != noise.shape[0]:
            raise InvalidInput(f"cond has {cond.tokens.shape[0]} rows for a batch of {noise.shape[0]}",
                               reason="INVALID_SHAPE", field="cond")  # fmt: skip
        seeds = _seeds(request, noise.shape[0])
        served = await self.family.run_blocking(self.family.runner.describe, name, version)  # NOT_FOUND/UNAVAILABLE
        facts, info = student_facts(served), student_info(served)
        timesteps = resolve_timesteps(facts.steps, request.steps, request.timesteps)
        deadline = time.monotonic() + remaining_seconds(context, self.family.settings)
        network = RunnerNetwork(self.family.runner, name, version, deadline)
        student = LocalStudent(network, info.sha256, facts, latent_channels=noise.shape[1])
        started = time.monotonic()

        def sample(callback) -> torch.Tensor:
            return student.sample_few(noise, cond, callback, timesteps=timesteps, seed=request.seed, seeds=seeds)

        def progress(i: int, n: int, x: torch.Tensor) -> pb.SampleResponse:
            event = pb.SampleResponse()
            event.progress.step, event.progress.total = i + 1, n
            event.progress.elapsed_seconds = time.monotonic() - started
            return event

        def finish(latents: torch.Tensor) -> pb.SampleResponse:
            result = pb.SampleResult(latents=tensors.encode(latents), model=info, timesteps=timesteps)  # (B, C, h, w)
            return pb.SampleResponse(result=result)

        # Closed with this stream (client cancel, deadline): the loop stops at its next step, not at garbage collection.
        async with contextlib.aclosing(stream_steps(self.family.run_blocking, sample, progress, finish)) as events:
            async for event in events:
                yield event

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        names = await self.family.run_blocking(self.family.runner.models)
        if self.jobs is not None:  # students distillations loaded: Triton's repository index does not list them
            names += await self.family.run_blocking(self.jobs.students)
        members = sorted({n for n in names if self.family.member(n)})
        models = await self.family.list_models(request.model, members)  # the teacher and other non-students left out
        return pb.ListModelsResponse(models=models, default_model=self.family.default)

    # -- distillation jobs ------------------------------------------------------------------------------

    async def _job_backend(self, context) -> DistillJobs:
        if self.jobs is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "distillation jobs are off on this server: set "
                                "KINEMA_REDIS_URL (redis://host:port/db) and run a job worker "
                                "(python -m services.orchestrator.worker); Sample works without them")  # fmt: skip
        return self.jobs

    def _teacher(self, spec: DistillationSpec) -> common_pb2.ModelInfo:
        """The served teacher (NOT_FOUND: unknown, not served, or a student itself)."""
        check_teacher(spec.teacher)
        try:
            served = self.family.runner.describe(spec.teacher, spec.teacher_version)
        except NotFound:
            raise NotFound(f"teacher {spec.teacher!r} (version {spec.teacher_version or 'latest'}) is not served; the "
                           "denoiser service's ListModels shows the denoiser models", reason="MODEL_NOT_FOUND",
                           field="teacher.name") from None  # fmt: skip
        try:
            is_student = StudentFacts.from_parameters(served.parameters) is not None
        except ValueError:
            is_student = True
        if is_student:
            raise NotFound(f"model {spec.teacher!r} is a distilled student, not a teacher; distil the denoiser it was "
                           "distilled from", reason="MODEL_NOT_FOUND", field="teacher.name")  # fmt: skip
        return common_pb2.ModelInfo(name=served.name, version=served.version, sha256=served.sha256,
                                    params_json=served.params_json)  # fmt: skip

    async def StartDistillation(self, request: pb.StartDistillationRequest, context) -> pb.StartDistillationResponse:
        jobs = await self._job_backend(context)
        tenant = tenant_of(context)
        spec = DistillationSpec.from_request(request)  # INVALID_ARGUMENT before anything is looked up

        def start():
            teacher = self._teacher(spec)
            if spec.name and spec.name in self.family.runner.models():
                raise AlreadyExists(f"a model named {spec.name!r} is served already; choose another name",
                                    reason="MODEL_EXISTS", field="name")  # fmt: skip
            return jobs.start(tenant, replace(spec, teacher_version=teacher.version), teacher)

        job = await self.family.run_blocking(start)
        return pb.StartDistillationResponse(distillation=distillation_message(job))

    async def GetDistillation(self, request: pb.GetDistillationRequest, context) -> pb.GetDistillationResponse:
        jobs = await self._job_backend(context)
        job = await self.family.run_blocking(jobs.get, tenant_of(context), request.id)
        return pb.GetDistillationResponse(distillation=distillation_message(job))

    async def CancelDistillation(self, request: pb.CancelDistillationRequest, context) -> pb.CancelDistillationResponse:
        jobs = await self._job_backend(context)
        job = await self.family.run_blocking(jobs.cancel, tenant_of(context), request.id)
        return pb.CancelDistillationResponse(distillation=distillation_message(job))


def build_server(settings: ServiceSettings) -> KinemaServer:
    """The distill service; distillation jobs on when KINEMA_REDIS_URL is set (`model_jobs.ModelJobSettings`)."""
    jobs_settings = job_settings()
    jobs = DistillJobs(jobs_settings) if jobs_settings.redis_url else None

    def servicer(family: ModelFamily) -> DistillServicer:
        # Students loaded with their files are gone after a Triton restart: load the stored ones again.
        restores = jobs_settings.artifacts and jobs_settings.restore_seconds and settings.backend == "triton"
        if jobs is not None and restores:
            restorer = ModelRestorer(jobs.store, STUDENTS_KEY, family.runner, jobs_settings.artifact_store())
            restorer.start(jobs_settings.restore_seconds)
        return DistillServicer(family, jobs)

    return build_model_server(
        settings,
        name="distill",
        service=SERVICE,
        add_to_server=pb_grpc.add_DistillServicer_to_server,
        servicer=servicer,
        default_model=DEFAULT_MODEL,
        family=FAMILY,
        info=student_info,
    )
