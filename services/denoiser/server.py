"""Denoiser service: owns the sampling loops and calls the denoiser networks once per step.

`Sample` runs the library's loop (`kinema.pipelines.local.LocalDenoiser`, the same code embedded mode
runs) in a worker thread; each step's network evaluation goes through the model runner (Triton by
default). `SampleVideo` does the same for one clip with a video denoiser (`LocalVideoDenoiser` over
`kinema.rpc.denoising.RunnerVideoNetwork`). Progress streams back as steps finish. A client cancel or an
expired deadline stops the loop at the next step.

Two model families share the runner: image denoisers (`denoiser`, `denoiser_<variant>`) for Sample and Predict,
video denoisers (`video_denoiser`, `video_denoiser_<variant>`) for SampleVideo; ListModels lists both, and a model
of one family named in the other's RPC is INVALID_ARGUMENT (reason WRONG_MODEL_KIND).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from kinema.common.v1 import common_pb2
from kinema.denoiser.v1 import denoiser_pb2 as pb
from kinema.denoiser.v1 import denoiser_pb2_grpc as pb_grpc
from kinema.errors import InvalidInput
from kinema.nn.text import TextEmbedding
from kinema.nn.video import VideoMMDiTParams
from kinema.pipelines.edit_video import resolve_window
from kinema.pipelines.local import SAMPLERS, LocalDenoiser, LocalVideoDenoiser
from kinema.pipelines.protocols import SampleSpec, VideoSpec
from kinema.rpc import tensors
from kinema.rpc.denoising import RunnerNetwork, RunnerVideoNetwork, conditioning, video_params
from kinema.rpc.models import ModelFamily, build_model_server
from kinema.rpc.server import KinemaServer, remaining_seconds
from kinema.rpc.settings import ServiceSettings
from kinema.rpc.streaming import StepCallback, stream_steps
from kinema.sampling.edit import start_latents
from kinema.sampling.schedule import get_schedule

SERVICE = "kinema.denoiser.v1.Denoiser"
MAX_STEPS = 1000
VIDEO_MODEL = "video_denoiser"  # the default video model, and the video family's name prefix


def _steps(steps: int, guidance: float, shift: float, start_step: int, has_init: bool) -> float:
    """Check the schedule fields Sample and SampleVideo share; returns the shift (0 -> 1)."""
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidInput(f"steps must be in 1..{MAX_STEPS}, got {steps}", reason="OUT_OF_RANGE", field="steps")
    if not math.isfinite(guidance) or guidance < 0:
        raise InvalidInput(f"guidance must be finite and >= 0, got {guidance}", reason="OUT_OF_RANGE",
                           field="guidance")  # fmt: skip
    shift = shift or 1.0
    if not math.isfinite(shift) or shift <= 0:
        raise InvalidInput(f"shift must be > 0, got {shift}", reason="OUT_OF_RANGE", field="shift")
    if not 0 <= start_step < steps:
        raise InvalidInput(f"start_step must be in 0..steps-1 ({steps - 1}), got {start_step}",
                           reason="OUT_OF_RANGE", field="start_step")  # fmt: skip
    if start_step and not has_init:
        raise InvalidInput("start_step > 0 needs init_latents to start from", reason="MISSING", field="init_latents")
    return shift


def _spec(request: pb.SampleRequest) -> SampleSpec:
    shift = _steps(request.steps, request.guidance, request.shift, request.start_step, request.HasField("init_latents"))
    sampler = request.sampler or "euler"
    if sampler not in SAMPLERS:
        raise InvalidInput(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}", reason="OUT_OF_RANGE",
                           field="sampler")  # fmt: skip
    if request.preview_every < 0:
        raise InvalidInput("preview_every must be >= 0", reason="OUT_OF_RANGE", field="preview_every")
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


def _video_spec(request: pb.SampleVideoRequest) -> VideoSpec:
    shift = _steps(request.steps, request.guidance, request.shift, request.start_step, request.HasField("init_latents"))
    for name in ("temporal_guidance", "structure_level"):
        value = getattr(request, name)
        high = 1.0 if name == "structure_level" else math.inf
        if not (math.isfinite(value) and 0 <= value <= high):
            raise InvalidInput(f"{name} must be in [0, {high:g}], got {value}", reason="OUT_OF_RANGE", field=name)
    return VideoSpec(steps=request.steps, guidance=request.guidance, temporal_guidance=request.temporal_guidance,
                     structure_level=request.structure_level, shift=shift, start_step=request.start_step)  # fmt: skip


def _clip(t: common_pb2.Tensor, field: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A (1, F, C, h, w) clip tensor of the request; with `shape`, it must have exactly that shape."""
    a = tensors.decode(t, field, np.float32, ndim=5, writable=True)
    if shape is not None and a.shape != shape:
        raise InvalidInput(f"{field} has shape {a.shape}, noise {shape}: they must agree", reason="INVALID_SHAPE",
                           field=field)  # fmt: skip
    if a.shape[0] != 1 or min(a.shape) == 0:
        raise InvalidInput(f"{field} must be one clip (1, F, C, h, w) with every side > 0, got {a.shape}",
                           reason="INVALID_SHAPE", field=field)  # fmt: skip
    return torch.from_numpy(a)


def _fits(noise: torch.Tensor, p: VideoMMDiTParams) -> None:
    """The clip fits the video model: channels, latent size (frames: `_window`)."""
    _, _, c, h, w = noise.shape
    if c != p.in_channels:
        raise InvalidInput(f"noise needs {p.in_channels} channels, got {c}", reason="INVALID_SHAPE", field="noise")
    if h % p.patch_size or w % p.patch_size or max(h, w) > p.patch_size * p.pos_embed_max_size:
        raise InvalidInput(f"noise latent size {h}x{w} must be a multiple of {p.patch_size} and at most "
                           f"{p.patch_size * p.pos_embed_max_size}", reason="INVALID_SHAPE", field="noise")  # fmt: skip


def _text(c: pb.Conditioning, field: str, p: VideoMMDiTParams) -> TextEmbedding:
    """One row of text conditioning of the model's widths."""
    e = conditioning(c, field)
    if e.tokens.shape[0] != 1 or e.tokens.shape[2] != p.context_dim or e.pooled.shape[1] != p.pooled_dim:
        raise InvalidInput(f"{field}: expected 1 row of width {p.context_dim} (pooled {p.pooled_dim}), got tokens "
                           f"{tuple(e.tokens.shape)} and pooled {tuple(e.pooled.shape)}", reason="INVALID_SHAPE",
                           field=field)  # fmt: skip
    return e


def _content(request: pb.SampleVideoRequest, p: VideoMMDiTParams) -> TextEmbedding | torch.Tensor:
    which = request.WhichOneof("content")
    if which is None:
        raise InvalidInput("give the content as cond (text) or reference_latent (a frame), one of them",
                           reason="MISSING", field="cond")  # fmt: skip
    if which == "cond":
        return _text(request.cond, "cond", p)
    ref = tensors.decode(request.reference_latent, "reference_latent", np.float32, ndim=4, writable=True)
    if ref.shape[:2] != (1, p.in_channels) or ref.shape[2] * ref.shape[3] < 2:
        raise InvalidInput(f"reference_latent must be (1, {p.in_channels}, h, w) with h * w >= 2, got {ref.shape}",
                           reason="INVALID_SHAPE", field="reference_latent")  # fmt: skip
    return torch.from_numpy(ref)


def _uncond(request: pb.SampleVideoRequest, content: TextEmbedding | torch.Tensor,
            p: VideoMMDiTParams) -> TextEmbedding:  # fmt: skip
    if request.HasField("uncond"):
        return _text(request.uncond, "uncond", p)
    if request.guidance != 1.0:
        raise InvalidInput("uncond is required when guidance != 1", reason="MISSING", field="uncond")
    if isinstance(content, TextEmbedding):
        return content
    # guidance 1 never evaluates the unconditional branch: one masked token of the model's widths stands in for it
    return TextEmbedding(torch.zeros(1, 1, p.context_dim), torch.zeros(1, 1, dtype=torch.bool),
                         torch.zeros(1, p.pooled_dim), [False])  # fmt: skip


def _structure(request: pb.SampleVideoRequest, noise: torch.Tensor, p: VideoMMDiTParams) -> torch.Tensor:
    if not request.HasField("structure"):
        raise InvalidInput("structure is required: the clip's normalised disparity (1, F, 1, h, w)", reason="MISSING",
                           field="structure")  # fmt: skip
    _, f, _, h, w = noise.shape
    s = tensors.decode(request.structure, "structure", np.float32, ndim=5, writable=True)
    if s.shape != (1, f, p.structure_channels, h, w):
        raise InvalidInput(f"structure must have shape {(1, f, p.structure_channels, h, w)} (noise's frames and "
                           f"size), got {s.shape}", reason="INVALID_SHAPE", field="structure")  # fmt: skip
    return torch.from_numpy(s)


def _window(request: pb.SampleVideoRequest, noise: torch.Tensor, p: VideoMMDiTParams) -> tuple[int, int]:
    """The request's window and overlap, checked before the stream starts (`resolve_window`, as the loop checks)."""
    resolve_window(noise.shape[1], request.window, request.overlap, p.max_frames)
    return request.window, request.overlap


def _wrong_kind(name: str, kind: str, rpc: str) -> InvalidInput:
    return InvalidInput(f"model {name!r} is {kind} denoiser: sample it with {rpc}", reason="WRONG_MODEL_KIND",
                        field="model.name")  # fmt: skip


class DenoiserServicer(pb_grpc.DenoiserServicer):
    def __init__(self, family: ModelFamily) -> None:
        self.family = family
        # The video models share the image family's runner (one Triton); a family of their own gives SampleVideo
        # its default model and keeps each family's names out of the other's RPCs.
        self.video = ModelFamily(family.runner, family.settings, VIDEO_MODEL)

    def _resolve(self, ref: common_pb2.ModelRef) -> tuple[str, str]:
        """An image denoiser for Sample / Predict; a video model's name is a clear error, not NOT_FOUND."""
        if ref.name and self.video.member(ref.name):
            raise _wrong_kind(ref.name, "a video", "SampleVideo")
        return self.family.resolve(ref)

    def _resolve_video(self, ref: common_pb2.ModelRef) -> tuple[str, str]:
        if ref.name and self.family.member(ref.name):
            raise _wrong_kind(ref.name, "an image", "Sample")
        return self.video.resolve(ref)

    async def Sample(self, request: pb.SampleRequest, context):
        name, version = self._resolve(request.model)
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

    async def SampleVideo(self, request: pb.SampleVideoRequest, context):
        name, version = self._resolve_video(request.model)
        spec = _video_spec(request)
        noise = _clip(request.noise, "noise")  # (1, F, C, h, w)
        served = await self.video.run_blocking(self.video.runner.describe, name, version)  # NOT_FOUND / UNAVAILABLE
        info, params = self.video.info(served), video_params(served.params_json, name)
        _fits(noise, params)
        content = _content(request, params)
        uncond = _uncond(request, content, params)
        structure = _structure(request, noise, params)
        init_latents = None
        if request.HasField("init_latents"):
            init_latents = _clip(request.init_latents, "init_latents", tuple(noise.shape))  # (1, F, C, h, w)
        window, overlap = _window(request, noise, params)
        deadline = time.monotonic() + remaining_seconds(context, self.video.settings)
        network = RunnerVideoNetwork(self.video.runner, name, version, deadline, params)
        denoiser = LocalVideoDenoiser(network, info.sha256)
        started = time.monotonic()

        def progress(i: int, n: int, x: torch.Tensor) -> pb.SampleVideoResponse:
            event = pb.SampleVideoResponse()
            event.progress.step, event.progress.total = i + 1, n
            event.progress.elapsed_seconds = time.monotonic() - started
            return event

        def sample(callback: StepCallback) -> torch.Tensor:
            return denoiser.sample_clip(noise, content, uncond, structure, spec, callback, init_latents=init_latents,
                                        window=window, overlap=overlap)  # fmt: skip

        def finish(latents: torch.Tensor) -> pb.SampleVideoResponse:
            return pb.SampleVideoResponse(result=pb.SampleVideoResult(latents=tensors.encode(latents), model=info))

        # Closed with this stream (client cancel, deadline): the loop stops at its next step, as Sample's.
        async with contextlib.aclosing(stream_steps(self.video.run_blocking, sample, progress, finish)) as events:
            async for event in events:
                yield event

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        name, version = self._resolve(request.model)
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
        names = await self.family.run_blocking(self.family.runner.models)
        models = [
            *await self.family.list_models(request.model, [n for n in names if self.family.member(n)]),
            *await self.video.list_models(request.model, [n for n in names if self.video.member(n)]),
        ]
        return pb.ListModelsResponse(models=models, default_model=self.family.default,
                                     default_video_model=self.video.default)  # fmt: skip


def build_server(settings: ServiceSettings) -> KinemaServer:
    return build_model_server(
        settings,
        name="denoiser",
        service=SERVICE,
        add_to_server=pb_grpc.add_DenoiserServicer_to_server,
        servicer=DenoiserServicer,
        default_model="denoiser",
    )
