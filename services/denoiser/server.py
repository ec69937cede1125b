"""Denoiser service: the sampling loops, run next to the network in Triton where it can, else here.

`Sample` checks the request (`kinema.rpc.denoising.SampleCall`), then runs the library's loop
(`kinema.pipelines.local.LocalDenoiser`, the same code embedded mode runs): whole, in Triton's loop model for the
denoiser (`<name>-loop`, the same weights: `kinema.inference.triton_sampler`), relaying its messages; or, for a
denoiser without one, in a worker thread here, each step's network evaluation one model-runner call (Triton by
default). `SampleVideo` runs its loop here the same way for one clip with a video denoiser (`LocalVideoDenoiser` over
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
from kinema.errors import InvalidInput, NotFound, Unavailable
from kinema.inference.triton_sampler import SampleStream, loop_model_name
from kinema.nn.text import TextEmbedding
from kinema.nn.video import VideoMMDiTParams
from kinema.pipelines.edit_video import resolve_window
from kinema.pipelines.local import LocalDenoiser, LocalVideoDenoiser
from kinema.pipelines.protocols import VideoSpec
from kinema.rpc import tensors
from kinema.rpc.denoising import (
    RunnerNetwork,
    RunnerVideoNetwork,
    SampleCall,
    check_schedule,
    conditioning,
    video_params,
)
from kinema.rpc.models import ModelFamily, build_model_server
from kinema.rpc.server import KinemaServer, remaining_seconds
from kinema.rpc.settings import ServiceSettings
from kinema.rpc.streaming import StepCallback, stream_steps

SERVICE = "kinema.denoiser.v1.Denoiser"
VIDEO_MODEL = "video_denoiser"  # the default video model, and the video family's name prefix


def _video_spec(request: pb.SampleVideoRequest) -> VideoSpec:
    shift = check_schedule(request.steps, request.guidance, request.shift, request.start_step,
                           request.HasField("init_latents"))  # fmt: skip
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
        call = SampleCall.parse(request)
        self.family.check_batch(call.noise.shape[0], "noise")
        info = await self.family.describe(name, version)  # NOT_FOUND / UNAVAILABLE before any work
        timeout = remaining_seconds(context, self.family.settings)
        loop_model = await self._loop_model(name, version, info)
        if loop_model is not None:
            events = self._sample_in_triton(loop_model, version, request, info, timeout)
        else:
            events = self._sample_here(call, name, version, info, timeout)
        # Closed with this stream (client cancel, deadline): the loop stops at its next step, not at garbage collection.
        async with contextlib.aclosing(events) as events:
            async for event in events:
                yield event

    async def _loop_model(self, name: str, version: str, info: common_pb2.ModelInfo) -> str | None:
        """The Triton model that runs `name`'s whole sampling loop next to its network, where the runner has one
        holding the same weights (sha256), else None: the loop then runs here, one runner call per step."""
        if not hasattr(self.family.runner, "stream"):
            return None
        loop = loop_model_name(name)
        try:
            served = await self.family.run_blocking(self.family.runner.describe, loop, version)
        except (NotFound, Unavailable):
            return None
        return loop if served.sha256 == info.sha256 else None

    async def _sample_here(self, call: SampleCall, name: str, version: str, info: common_pb2.ModelInfo,
                           timeout: float):  # fmt: skip
        network = RunnerNetwork(self.family.runner, name, version, time.monotonic() + timeout)
        denoiser = LocalDenoiser(network, info.sha256, latent_channels=call.noise.shape[1])

        def finish(latents: torch.Tensor) -> pb.SampleResponse:
            return pb.SampleResponse(result=pb.SampleResult(latents=tensors.encode(latents), model=info))

        steps = stream_steps(self.family.run_blocking, lambda callback: call.sample(denoiser, callback),
                             call.progress(), finish)  # fmt: skip
        async with contextlib.aclosing(steps) as events:
            async for event in events:
                yield event

    async def _sample_in_triton(self, loop_model: str, version: str, request: pb.SampleRequest,
                                info: common_pb2.ModelInfo, timeout: float):  # fmt: skip
        """The request's loop run by `loop_model` (`kinema.inference.triton_sampler`): its messages relayed as they
        come, the result's ModelInfo filled in here."""
        stream = SampleStream(self.family.runner, loop_model, version, request, timeout)

        def relay(callback: StepCallback) -> pb.SampleResponse:
            for event in stream:
                if event.HasField("result"):
                    return event
                callback(event.progress.step - 1, event.progress.total, event)
            raise Unavailable(f"{loop_model} ended the stream without a result")

        def finish(event: pb.SampleResponse) -> pb.SampleResponse:
            event.result.model.CopyFrom(info)
            return event

        try:
            steps = stream_steps(self.family.run_blocking, relay, lambda i, n, event: event, finish)
            async with contextlib.aclosing(steps) as events:
                async for event in events:
                    yield event
        finally:
            stream.close()  # cancels the Triton request (client gone, deadline, error): its loop stops at a step

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
