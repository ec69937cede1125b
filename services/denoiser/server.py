"""Denoiser service: owns the sampling loop and calls the denoiser network once per step.

`Sample` runs the library's loop (`kinema.pipelines.local.LocalDenoiser`, the same code embedded mode
runs) in a worker thread; each step's network evaluation goes through the model runner (Triton by
default). Progress streams back as steps finish. A client cancel or an expired deadline stops the loop
at the next step.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from kinema.denoiser.v1 import denoiser_pb2 as pb
from kinema.denoiser.v1 import denoiser_pb2_grpc as pb_grpc
from kinema.errors import InvalidInput
from kinema.pipelines.local import SAMPLERS, LocalDenoiser
from kinema.pipelines.protocols import SampleSpec
from kinema.rpc import tensors
from kinema.rpc.denoising import RunnerNetwork, conditioning
from kinema.rpc.models import ModelFamily, build_model_server
from kinema.rpc.server import KinemaServer, remaining_seconds
from kinema.rpc.settings import ServiceSettings
from kinema.rpc.streaming import StepCallback, stream_steps
from kinema.sampling.edit import start_latents
from kinema.sampling.schedule import get_schedule

SERVICE = "kinema.denoiser.v1.Denoiser"
MAX_STEPS = 1000


def _spec(request: pb.SampleRequest) -> SampleSpec:
    if not 1 <= request.steps <= MAX_STEPS:
        raise InvalidInput(f"steps must be in 1..{MAX_STEPS}, got {request.steps}", reason="OUT_OF_RANGE",
                           field="steps")  # fmt: skip
    if not math.isfinite(request.guidance) or request.guidance < 0:
        raise InvalidInput(f"guidance must be finite and >= 0, got {request.guidance}", reason="OUT_OF_RANGE",
                           field="guidance")  # fmt: skip
    sampler = request.sampler or "euler"
    if sampler not in SAMPLERS:
        raise InvalidInput(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}", reason="OUT_OF_RANGE",
                           field="sampler")  # fmt: skip
    shift = request.shift or 1.0
    if not math.isfinite(shift) or shift <= 0:
        raise InvalidInput(f"shift must be > 0, got {shift}", reason="OUT_OF_RANGE", field="shift")
    if request.preview_every < 0:
        raise InvalidInput("preview_every must be >= 0", reason="OUT_OF_RANGE", field="preview_every")
    if not 0 <= request.start_step < request.steps:
        raise InvalidInput(f"start_step must be in 0..steps-1 ({request.steps - 1}), got {request.start_step}",
                           reason="OUT_OF_RANGE", field="start_step")  # fmt: skip
    if request.start_step and not request.HasField("init_latents"):
        raise InvalidInput("start_step > 0 needs init_latents to start from", reason="MISSING", field="init_latents")
    return SampleSpec(steps=request.steps, guidance=request.guidance, sampler=sampler, shift=shift,
                      start_step=request.start_step)  # fmt: skip


def _edit(request: pb.SampleRequest, noise: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The request's init latents and mask, checked against the noise's shape (None where unset)."""
    if not request.HasField("init_latents"):
        if request.HasField("mask"):
            raise InvalidInput("mask needs init_latents: the latents it keeps", reason="MISSING", field="init_latents")
        return None, None
    init = tensors.decode(request.init_latents, "init_latents", np.float32, ndim=4, writable=True)  # (B, C, h, w)
    if init.shape != tuple(noise.shape):
        raise InvalidInput(f"init_latents has shape {init.shape}, noise {tuple(noise.shape)}: they must agree",
                           reason="INVALID_SHAPE", field="init_latents")  # fmt: skip
    if not np.isfinite(init).all():
        raise InvalidInput("init_latents must be finite", reason="OUT_OF_RANGE", field="init_latents")
    if not request.HasField("mask"):
        return torch.from_numpy(init), None
    mask = tensors.decode(request.mask, "mask", np.float32, ndim=4, writable=True)  # (B or 1, 1, h, w)
    b, _, h, w = noise.shape
    if mask.shape[0] not in (1, b) or mask.shape[1:] != (1, h, w):
        raise InvalidInput(f"mask must have shape (1 or {b}, 1, {h}, {w}), got {mask.shape}",
                           reason="INVALID_SHAPE", field="mask")  # fmt: skip
    if not (np.isfinite(mask).all() and (mask >= 0).all() and (mask <= 1).all()):
        raise InvalidInput("mask values must be in [0, 1]", reason="OUT_OF_RANGE", field="mask")
    return torch.from_numpy(init), torch.from_numpy(mask)


class DenoiserServicer(pb_grpc.DenoiserServicer):
    def __init__(self, family: ModelFamily) -> None:
        self.family = family

    async def Sample(self, request: pb.SampleRequest, context):
        name, version = self.family.resolve(request.model)
        spec = _spec(request)
        noise = torch.from_numpy(tensors.decode(request.noise, "noise", np.float32, ndim=4, writable=True))
        self.family.check_batch(noise.shape[0], "noise")
        cond = conditioning(request.cond, "cond")
        if cond.tokens.shape[0] != noise.shape[0]:
            raise InvalidInput(f"cond has {cond.tokens.shape[0]} rows for a batch of {noise.shape[0]}",
                               reason="INVALID_SHAPE", field="cond")  # fmt: skip
        if spec.guidance != 1.0:
            if not request.HasField("uncond"):
                raise InvalidInput("uncond is required when guidance != 1", reason="MISSING", field="uncond")
            uncond = conditioning(request.uncond, "uncond")
            if uncond.tokens.shape[0] not in (1, noise.shape[0]):
                raise InvalidInput("uncond must have 1 or B rows", reason="INVALID_SHAPE", field="uncond")
        else:
            uncond = cond
        init_latents, mask = _edit(request, noise)
        info = await self.family.describe(name, version)  # NOT_FOUND / UNAVAILABLE before any work
        deadline = time.monotonic() + remaining_seconds(context, self.family.settings)
        network = RunnerNetwork(self.family.runner, name, version, deadline)
        denoiser = LocalDenoiser(network, info.sha256, latent_channels=noise.shape[1])
        schedule = get_schedule(spec.steps, spec.shift)[spec.start_step :]

        started = time.monotonic()
        previous = [start_latents(noise, schedule[0], init_latents)]

        def progress(i: int, n: int, x: torch.Tensor) -> pb.SampleResponse:
            event = pb.SampleResponse()
            event.progress.step, event.progress.total = i + 1, n
            event.progress.elapsed_seconds = time.monotonic() - started
            if request.preview_every and (i + 1) % request.preview_every == 0:
                t, t_next = schedule[i], schedule[i + 1]
                v = (x - previous[0]) / (t_next - t)  # the step's effective velocity (guided, blended)
                event.progress.preview.CopyFrom(tensors.encode(previous[0] - t * v))
            previous[0] = x
            return event

        def sample(callback: StepCallback) -> torch.Tensor:
            return denoiser.sample(noise, cond, uncond, spec, callback, init_latents=init_latents, mask=mask)

        def finish(latents: torch.Tensor) -> pb.SampleResponse:
            return pb.SampleResponse(result=pb.SampleResult(latents=tensors.encode(latents), model=info))

        # Closed with this stream (client cancel, deadline): the loop stops at its next step, not at garbage collection.
        async with contextlib.aclosing(stream_steps(self.family.run_blocking, sample, progress, finish)) as events:
            async for event in events:
                yield event

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        name, version = self.family.resolve(request.model)
        x = tensors.decode(request.x, "x", np.float32, ndim=4)  # (B, C, h, w)
        t = tensors.decode(request.t, "t", np.float32, ndim=1)  # (B,)
        self.family.check_batch(x.shape[0], "x")
        cond = conditioning(request.cond, "cond")
        if t.shape[0] != x.shape[0] or cond.tokens.shape[0] != x.shape[0]:
            raise InvalidInput("x, t and cond must have the same batch size", reason="INVALID_SHAPE", field="t")
        inputs = {"X": x, "T": t[:, None], "CONTEXT": cond.tokens.numpy(), "CONTEXT_MASK": cond.mask.numpy(),
                  "POOLED": cond.pooled.numpy()}  # fmt: skip
        out = await self.family.call(context, name, version, inputs)
        return pb.PredictResponse(
            velocity=tensors.encode(out["VELOCITY"]), model=await self.family.describe(name, version)
        )

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = await self.family.list_models(request.model)
        return pb.ListModelsResponse(models=models, default_model=self.family.default)


def build_server(settings: ServiceSettings) -> KinemaServer:
    return build_model_server(
        settings,
        name="denoiser",
        service=SERVICE,
        add_to_server=pb_grpc.add_DenoiserServicer_to_server,
        servicer=DenoiserServicer,
        default_model="denoiser",
    )
