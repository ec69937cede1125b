"""Capability protocols the pipelines are written against (in-process or gRPC clients alike)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from kinema.nn.text import TextEmbedding
from kinema.sampling.samplers import Callback


class TextEncoder(Protocol):
    def encode(self, prompts: list[str]) -> TextEmbedding: ...

    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class SampleSpec:
    """What the denoiser needs to run a whole sampling loop.

    `start_step` > 0 skips the first steps of the `steps` schedule (SDEdit; `kinema.sampling.edit.start_step`
    turns a strength into it); it needs init latents.
    """

    steps: int
    guidance: float
    sampler: str = "euler"
    shift: float = 1.0
    start_step: int = 0


class Denoiser(Protocol):
    """Owns the sampling loop: noise (B, C, h, w) + text -> clean latents.

    With `init_latents` (B, C, h, w) the loop starts from them noised with `noise` to the time of
    `spec.start_step` (`kinema.sampling.edit.noised`); with `mask` (B or 1, 1, h, w), 1 = generate, it keeps
    the init latents outside the mask (`kinema.sampling.edit.sample_masked`). The callback's n is the number
    of steps run, steps - start_step.
    """

    latent_channels: int

    def sample(
        self,
        noise: Tensor,
        cond: TextEmbedding,
        uncond: TextEmbedding,
        spec: SampleSpec,
        callback: Callback | None,
        *,
        init_latents: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor: ...

    def fingerprint(self) -> str: ...


class Student(Protocol):
    """A few-step student distilled from a denoiser (LADD): noise (B, C, h, w) + text -> clean latents in 1-8
    steps without classifier-free guidance (kinema.distill.v1.Distill.Sample).

    `steps` 0: the steps it was distilled for (`default_steps`); `timesteps`: explicit start times instead
    (`kinema.pipelines.student.resolve_timesteps` checks both). The fresh noise between steps comes from one
    generator seeded `seed`, or with `seeds` (B values) from one per row, so that a row does not depend on the
    rest of the batch. The callback gets (i, n, x) once per finished step. A pipeline tells a student from a
    `Denoiser` with `is_student`.
    """

    latent_channels: int
    default_steps: int

    def sample_few(
        self,
        noise: Tensor,
        cond: TextEmbedding,
        callback: Callback | None,
        *,
        steps: int = 0,
        timesteps: Sequence[float] = (),
        seed: int = 0,
        seeds: Sequence[int] = (),
    ) -> Tensor: ...

    def fingerprint(self) -> str: ...


def is_student(denoiser: Any) -> bool:
    """Whether a pipeline's denoiser is a few-step `Student` (looked up on its class: no property runs, so a
    remote client makes no call to answer)."""
    return callable(getattr(type(denoiser), "sample_few", None))


class Autoencoder(Protocol):
    downscale: int
    latent_channels: int

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def fingerprint(self) -> str: ...


class DepthEstimator(Protocol):
    """Monocular depth: images (B, 3, H, W) in [-1, 1] -> relative inverse depth (B, 1, H, W), larger = nearer,
    defined up to a positive scale and shift per image (MiDaS; kinema.depth.v1.Depth.Estimate)."""

    def estimate(self, images: Tensor) -> Tensor: ...

    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class VideoSpec:
    """What the video denoiser needs to sample a clip (Gen-1, `kinema.sampling.temporal`).

    guidance: classifier-free guidance omega over the content; temporal_guidance: omega_t, from the frame-wise
    prediction (0) to the video prediction (1) and beyond; structure_level: t_s in [0, 1], how far the depth
    structure is degraded before the network sees it (0 follows the input's structure closely, 1 loosely).
    `start_step` > 0 starts part-way along the `steps` schedule from the init latents (SDEdit).
    """

    steps: int
    guidance: float
    temporal_guidance: float
    structure_level: float
    shift: float = 1.0
    start_step: int = 0


class VideoDenoiser(Protocol):
    """Owns the video sampling loop: noise (1, F, C, h, w) + content + per-frame structure -> clean latents.

    `content` is a text embedding, or a reference frame's latent (1, C, h, w) (content from an image, keyframe
    propagation); `uncond` is the empty prompt's embedding for classifier-free guidance. `structure` (1, F, 1, h, w)
    in [-1, 1] is the clip's normalised disparity at the latent size (`kinema.nn.video.structure_input`), not yet
    degraded: the denoiser degrades it to `spec.structure_level`. `init_latents` are what a run with
    `spec.start_step` > 0 starts from. The network sees at most `max_frames` frames at once: a longer clip needs
    `window` (2..max_frames) and `overlap` (0..window-1), and every step then evaluates all windows of
    `kinema.sampling.windows.plan_windows` and blends their velocities where they overlap
    (`kinema.sampling.windows.windowed_predictor`), so windows agree where they meet. window 0: one window of F.
    """

    latent_channels: int
    max_frames: int

    def sample_clip(
        self,
        noise: Tensor,
        content: TextEmbedding | Tensor,
        uncond: TextEmbedding,
        structure: Tensor,
        spec: VideoSpec,
        callback: Callback | None,
        *,
        init_latents: Tensor | None = None,
        window: int = 0,
        overlap: int = 0,
    ) -> Tensor: ...

    def fingerprint(self) -> str: ...
