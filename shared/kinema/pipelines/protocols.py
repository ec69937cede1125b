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
