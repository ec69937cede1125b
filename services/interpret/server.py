"""Interpret service: Analyze / Edit images, Factorize / Compose / Traverse latents, Translate representations
(net2net) and ListModels, over the `iin_*` networks and the autoencoder `vae` (Triton or in-process).

Model `iin_factor` (the default) is the Triton model `iin_factor`; every `iin_<kind>` model is one of this
service's. The work itself is `kinema.inference.interpreter.Interpreter`, which `kinema interpret` runs in
process; this module only maps protos to it and back.

Fittings (`Fit`, `GetFitting`, `CancelFitting`) are jobs: this service checks the request and that Triton serves the
representation's encoder, records the job, claims the new model's name and queues it
(`kinema.orchestration.fitting.FitJobs`); the orchestrator's job worker trains, scores, stores and loads the model
into Triton, after which `ListModels` lists it and every RPC serves it. Without KINEMA_REDIS_URL they answer
UNIMPLEMENTED. With the artifact store too (KINEMA_ARTIFACTS), the service loads fitted models Triton has dropped (a
restart) back into it every KINEMA_MODEL_RESTORE_SECONDS (`kinema.orchestration.model_jobs.ModelRestorer`).
"""

from __future__ import annotations

from functools import partial

import grpc
import numpy as np

from kinema.common.v1 import common_pb2
from kinema.errors import AlreadyExists, InvalidInput, NotFound
from kinema.inference.interpreter import Interpreter
from kinema.interpret.v1 import interpret_pb2 as pb
from kinema.interpret.v1 import interpret_pb2_grpc as pb_grpc
from kinema.orchestration.fitting import MODELS_KEY, FitJobs, FitSpec, encoder_name, fitting_message, job_settings
from kinema.orchestration.model_jobs import ModelRestorer
from kinema.rpc import tensors
from kinema.rpc.auth import tenant_of
from kinema.rpc.models import ModelFamily, build_model_server, model_info
from kinema.rpc.server import KinemaServer, remaining_seconds
from kinema.rpc.settings import ServiceSettings

SERVICE = "kinema.interpret.v1.Interpret"


class InterpretServicer(pb_grpc.InterpretServicer):
    def __init__(self, family: ModelFamily, jobs: FitJobs | None = None) -> None:
        self.family = family
        self.jobs = jobs
        self.interpreter = Interpreter(family.runner)

    async def _run(self, context, method, *args, **kwargs):
        """One interpreter operation off the event loop, bounded by the request's remaining time."""
        timeout = remaining_seconds(context, self.family.settings)
        return await self.family.run_blocking(partial(method, *args, timeout=timeout, **kwargs))

    def _batch(self, t, field: str, ndim: int | None = None) -> np.ndarray:
        """A request's float32 batch (B, ...), B >= 1 and within the service's limit."""
        a = tensors.decode(t, field, np.float32, ndim=ndim)
        if a.ndim < 2 or not a.shape[0]:
            raise InvalidInput(f"{field}: expected a batch (B, ...), got shape {list(a.shape)}",
                               reason="INVALID_SHAPE", field=field)  # fmt: skip
        self.family.check_batch(a.shape[0], field)
        return a

    async def Factorize(self, request: pb.FactorizeRequest, context) -> pb.FactorizeResponse:
        name, version = self.family.resolve(request.model)
        latents = self._batch(request.latents, "latents")
        f = await self._run(context, self.interpreter.factorize, name, version, latents)
        return pb.FactorizeResponse(
            factors=tensors.encode(f.factors),  # (B, K, D)
            factor_names=f.names,
            residual=tensors.encode(f.residual),  # (B, R)
            model=model_info(f.model),
            outside=tensors.encode(f.outside),  # (B, N)
        )

    async def Compose(self, request: pb.ComposeRequest, context) -> pb.ComposeResponse:
        name, version = self.family.resolve(request.model)
        factors = self._batch(request.factors, "factors", ndim=3)
        residual = tensors.decode(request.residual, "residual", np.float32, ndim=2)
        outside = None
        if request.HasField("outside"):  # unset: the data mean outside the model's components
            outside = tensors.decode(request.outside, "outside", np.float32, ndim=2)
        latents, served = await self._run(context, self.interpreter.compose, name, version, factors, residual, outside)
        return pb.ComposeResponse(latents=tensors.encode(latents), model=model_info(served))

    async def Traverse(self, request: pb.TraverseRequest, context) -> pb.TraverseResponse:
        name, version = self.family.resolve(request.model)
        if request.mode not in (pb.TRAVERSE_MODE_SET, pb.TRAVERSE_MODE_SHIFT):
            raise InvalidInput("mode: set TRAVERSE_MODE_SET or TRAVERSE_MODE_SHIFT", reason="INVALID_MODE",
                               field="mode")  # fmt: skip
        latents = self._batch(request.latents, "latents")
        value = tensors.decode(request.value, "value", np.float32)
        scales = list(request.scales)
        if not np.isfinite(scales).all():
            raise InvalidInput("scales: contains NaN or Inf", reason="NON_FINITE", field="scales")
        self.family.check_batch(len(latents) * max(1, len(scales)), "scales")  # one composed item per edit
        out, served = await self._run(
            context, self.interpreter.traverse, name, version, latents, request.factor,
            request.mode == pb.TRAVERSE_MODE_SHIFT, value, scales,
        )  # fmt: skip
        return pb.TraverseResponse(latents=tensors.encode(out), model=model_info(served))  # (B, S, ...)

    async def Analyze(self, request: pb.AnalyzeRequest, context) -> pb.AnalyzeResponse:
        name, version = self.family.resolve(request.model)
        images = self.family.images(request.images)  # (B, 3, H, W)
        a = await self._run(context, self.interpreter.analyze, name, version, images)
        factors = [
            pb.FactorScores(factor=r.factor, values=r.values, scores=tensors.encode(r.scores), best=r.best)
            for r in a.factors
        ]
        return pb.AnalyzeResponse(factors=factors, model=model_info(a.model), autoencoder=model_info(a.autoencoder))

    async def Edit(self, request: pb.EditRequest, context) -> pb.EditResponse:
        name, version = self.family.resolve(request.model)
        images = self.family.images(request.images)  # (B, 3, H, W)
        e = await self._run(context, self.interpreter.edit, name, version, images, dict(request.values))
        return pb.EditResponse(
            images=tensors.encode(e.images), model=model_info(e.model), autoencoder=model_info(e.autoencoder)
        )

    async def Translate(self, request: pb.TranslateRequest, context) -> pb.TranslateResponse:
        name, version = self.family.resolve(request.model)
        source = self._batch(request.source, "source", ndim=2)  # (B, S)
        temperature = request.temperature if request.HasField("temperature") else 1.0
        t = await self._run(
            context, self.interpreter.translate, name, version, source, request.seed, temperature, request.decode
        )
        response = pb.TranslateResponse(latents=tensors.encode(t.latents), model=model_info(t.model))
        if t.images is not None:
            response.images.CopyFrom(tensors.encode(t.images))
            response.autoencoder.CopyFrom(model_info(t.autoencoder))
        return response

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        members = None
        if self.jobs is not None:  # models fittings loaded: Triton's repository index does not list them
            names = await self.family.run_blocking(self.family.runner.models)
            names += await self.family.run_blocking(self.jobs.models)
            members = sorted({n for n in names if self.family.member(n)})
        models = await self.family.list_models(request.model, members)
        return pb.ListModelsResponse(models=models, default_model=self.family.default)

    # -- fitting jobs ------------------------------------------------------------------------------------

    async def _job_backend(self, context) -> FitJobs:
        if self.jobs is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fitting jobs are off on this server: set "
                                "KINEMA_REDIS_URL (redis://host:port/db) and run a job worker "
                                "(python -m services.orchestrator.worker); the other RPCs work without")  # fmt: skip
        return self.jobs

    def _encoder(self, spec: FitSpec) -> common_pb2.ModelInfo:
        """The served encoder of the representation (NOT_FOUND when this deployment does not serve it)."""
        name = encoder_name(spec.representation)
        try:
            served = self.family.runner.describe(name)
        except NotFound:
            raise NotFound(f"representation {spec.representation!r} needs the model {name!r}, which is not served "
                           "here", reason="MODEL_NOT_FOUND", field="representation") from None  # fmt: skip
        return common_pb2.ModelInfo(name=served.name, version=served.version, sha256=served.sha256,
                                    params_json=served.params_json)  # fmt: skip

    async def Fit(self, request: pb.FitRequest, context) -> pb.FitResponse:
        jobs = await self._job_backend(context)
        tenant = tenant_of(context)
        spec = FitSpec.from_request(request)  # INVALID_ARGUMENT before anything is looked up

        def start():
            encoder = self._encoder(spec)
            if spec.name and (spec.name in self.family.runner.models() or spec.name in jobs.models()):
                raise AlreadyExists(f"a model named {spec.name!r} is served already; choose another name",
                                    reason="MODEL_EXISTS", field="name")  # fmt: skip
            return jobs.start(tenant, spec, encoder)

        job = await self.family.run_blocking(start)
        return pb.FitResponse(fitting=fitting_message(job))

    async def GetFitting(self, request: pb.GetFittingRequest, context) -> pb.GetFittingResponse:
        jobs = await self._job_backend(context)
        job = await self.family.run_blocking(jobs.get, tenant_of(context), request.id)
        return pb.GetFittingResponse(fitting=fitting_message(job))

    async def CancelFitting(self, request: pb.CancelFittingRequest, context) -> pb.CancelFittingResponse:
        jobs = await self._job_backend(context)
        job = await self.family.run_blocking(jobs.cancel, tenant_of(context), request.id)
        return pb.CancelFittingResponse(fitting=fitting_message(job))


def build_server(settings: ServiceSettings) -> KinemaServer:
    """The interpret service; fitting jobs on when KINEMA_REDIS_URL is set (`model_jobs.ModelJobSettings`)."""
    jobs_settings = job_settings()
    jobs = FitJobs(jobs_settings) if jobs_settings.redis_url else None

    def servicer(family: ModelFamily) -> InterpretServicer:
        # Models loaded with their files are gone after a Triton restart: load the stored ones again.
        restores = jobs_settings.artifacts and jobs_settings.restore_seconds and settings.backend == "triton"
        if jobs is not None and restores:
            restorer = ModelRestorer(jobs.store, MODELS_KEY, family.runner, jobs_settings.artifact_store())
            restorer.start(jobs_settings.restore_seconds)
        return InterpretServicer(family, jobs)

    return build_model_server(
        settings,
        name="interpret",
        service=SERVICE,
        add_to_server=pb_grpc.add_InterpretServicer_to_server,
        servicer=servicer,
        default_model="iin_factor",
        family="iin",
    )
