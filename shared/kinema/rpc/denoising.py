"""What the denoiser and distill services share: a velocity network whose evaluations are model-runner calls, and
text conditioning decoded off the wire (`kinema.denoiser.v1.Conditioning`, which the distill service reuses); the
video network the denoiser's SampleVideo runs over the runner (`RunnerVideoNetwork`); and a checked SampleRequest
(`SampleCall`) with the messages its loop streams, wherever that loop runs: in the denoiser service, or in Triton
next to the network (`kinema.inference.triton_sampler`)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kinema.denoiser.v1 import denoiser_pb2 as pb
from kinema.errors import DeadlineExceeded, InvalidInput, Unavailable
from kinema.inference.runner import ModelRunner
from kinema.nn.text import TextEmbedding
from kinema.nn.video import VideoMMDiTParams
from kinema.pipelines.local import SAMPLERS, LocalDenoiser
from kinema.pipelines.protocols import SampleSpec
from kinema.rpc import tensors
from kinema.sampling.edit import start_latents
from kinema.sampling.schedule import get_schedule

MAX_STEPS = 1000


class RunnerNetwork:
    """A velocity network whose every evaluation is one runner call (Triton's `denoiser`, or a student); each call is
    bounded by the request's deadline."""

    def __init__(self, runner: ModelRunner, model: str, version: str, deadline: float) -> None:
        self.runner, self.model, self.version, self.deadline = runner, model, version, deadline

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed during sampling")
        return self.runner.infer(self.model, inputs, self.version, left)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 context_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        inputs = {
            "X": x.numpy(),  # (B, C, h, w)
            "T": t[:, None].numpy(),  # (B, 1)
            "CONTEXT": context.numpy(),  # (B, L, D)
            "CONTEXT_MASK": context_mask.numpy(),  # (B, L)
            "POOLED": pooled.numpy(),  # (B, P)
        }
        return torch.from_numpy(self._infer(inputs)["VELOCITY"])


def video_params(params_json: str, model: str) -> VideoMMDiTParams:
    """A video model's params from the `params_json` its config publishes (lists become tuples, as in checkpoints)."""
    try:
        params = json.loads(params_json or "null")
        return VideoMMDiTParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    except (AttributeError, TypeError, ValueError) as e:  # absent, not a dict, unknown keys, bad values
        raise Unavailable(f"video model {model!r} does not publish valid params (config params_json): {e}") from None


class RunnerVideoNetwork(RunnerNetwork):
    """A `kinema.pipelines.local.VideoNetwork` whose every evaluation, and `reference`, is one runner call (Triton's
    `video_denoiser`); `params` are the ones the model publishes. Each call is bounded by the request's deadline."""

    def __init__(self, runner: ModelRunner, model: str, version: str, deadline: float,
                 params: VideoMMDiTParams) -> None:  # fmt: skip
        super().__init__(runner, model, version, deadline)
        self.params = params

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 context_mask: torch.Tensor | None = None, *, structure: torch.Tensor | None = None,
                 structure_level: torch.Tensor | None = None, temporal: bool = True) -> torch.Tensor:  # fmt: skip
        b = x.shape[0]
        if context_mask is None:  # VideoMMDiT's None: every token attends
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool)
        inputs = {
            "X": x.numpy(),  # (B, F, C, h, w)
            "T": t.expand(b)[:, None].numpy(),  # (B, 1)
            "CONTEXT": context.numpy(),  # (B, L, D)
            "CONTEXT_MASK": context_mask.numpy(),  # (B, L)
            "POOLED": pooled.numpy(),  # (B, P)
            "TEMPORAL": np.full((b, 1), temporal),  # (B, 1)
        }
        if structure is not None:
            inputs["STRUCTURE"] = structure.numpy()  # (B, F, S, h, w)
        if structure_level is not None:
            inputs["STRUCTURE_LEVEL"] = structure_level.expand(b)[:, None].numpy()  # (B, 1)
        return torch.from_numpy(self._infer(inputs)["VELOCITY"])  # (B, F, C, h, w)

    def reference(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reference frame's latent (B, C, h, w) -> content (tokens (B, G, D), mask (B, G), pooled (B, P))."""
        out = self._infer({"REFERENCE_LATENT": latent.numpy()})
        return tuple(torch.from_numpy(out[k]) for k in ("CONTENT_TOKENS", "CONTENT_MASK", "CONTENT_POOLED"))


def conditioning(c: pb.Conditioning, field: str) -> TextEmbedding:
    """A request's text conditioning, checked: tokens (B, L, D), mask (B, L) and pooled (B, P) agree, B, L > 0."""
    tokens = tensors.decode(c.tokens, f"{field}.tokens", np.float32, ndim=3)  # (B, L, D)
    mask = tensors.decode(c.mask, f"{field}.mask", np.bool_, ndim=2)  # (B, L)
    pooled = tensors.decode(c.pooled, f"{field}.pooled", np.float32, ndim=2)  # (B, P)
    b, length = tokens.shape[:2]
    if mask.shape != (b, length) or pooled.shape[0] != b or b == 0 or length == 0:
        raise InvalidInput(
            f"{field}: tokens {tokens.shape}, mask {mask.shape} and pooled {pooled.shape} must agree on (B, L), with "
            "B > 0 and L > 0 (the text encoder gives at least one token per prompt)",
            reason="INVALID_SHAPE", field=field,
        )  # fmt: skip
    return TextEmbedding(torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(pooled), [False] * b)


def check_schedule(steps: int, guidance: float, shift: float, start_step: int, has_init: bool) -> float:
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
    shift = check_schedule(request.steps, request.guidance, request.shift, request.start_step,
                           request.HasField("init_latents"))  # fmt: skip
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


@dataclass(frozen=True)
class SampleCall:
    """A checked `SampleRequest`: its loop, and the messages that loop streams (one Progress per step, with every
    `preview_every`-th step's predicted clean latents, then the result). The denoiser service checks a request
    with it before anything runs; the loop then runs there or in Triton's loop model, which parses the same
    request again."""

    request: pb.SampleRequest
    spec: SampleSpec
    noise: torch.Tensor  # (B, C, h, w)
    cond: TextEmbedding
    uncond: TextEmbedding
    init_latents: torch.Tensor | None
    mask: torch.Tensor | None

    @classmethod
    def parse(cls, request: pb.SampleRequest) -> SampleCall:
        spec = _spec(request)
        noise = torch.from_numpy(tensors.decode(request.noise, "noise", np.float32, ndim=4, writable=True))
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
        return cls(request, spec, noise, cond, uncond, init_latents, mask)

    def sample(self, denoiser: LocalDenoiser, callback: Callable[[int, int, torch.Tensor], None] | None
               ) -> torch.Tensor:  # fmt: skip
        """The whole loop around `denoiser`'s network; `callback(i, n, x)` after each step."""
        return denoiser.sample(self.noise, self.cond, self.uncond, self.spec, callback, init_latents=self.init_latents,
                               mask=self.mask)  # fmt: skip

    def progress(self) -> Callable[[int, int, torch.Tensor], pb.SampleResponse]:
        """A fresh step -> Progress message function for one run of the loop (it keeps the previous step's latents
        for the previews)."""
        schedule = get_schedule(self.spec.steps, self.spec.shift)[self.spec.start_step :]
        started = time.monotonic()
        previous = [start_latents(self.noise, schedule[0], self.init_latents)]
        every = self.request.preview_every

        def message(i: int, n: int, x: torch.Tensor) -> pb.SampleResponse:
            event = pb.SampleResponse()
            event.progress.step, event.progress.total = i + 1, n
            event.progress.elapsed_seconds = time.monotonic() - started
            if every and (i + 1) % every == 0:
                t, t_next = schedule[i], schedule[i + 1]
                v = (x - previous[0]) / (t_next - t)  # the step's effective velocity (guided, blended)
                event.progress.preview.CopyFrom(tensors.encode(previous[0] - t * v))
            previous[0] = x
            return event

        return message
