"""Capability protocols the pipelines are written against (in-process or gRPC clients alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class Autoencoder(Protocol):
    downscale: int
    latent_channels: int

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def fingerprint(self) -> str: ...
