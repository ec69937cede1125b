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
    """What the denoiser needs to run a whole sampling loop."""

    steps: int
    guidance: float
    sampler: str = "euler"
    shift: float = 1.0


class Denoiser(Protocol):
    """Owns the sampling loop: noise (B, C, h, w) + text -> clean latents."""

    latent_channels: int

    def sample(
        self, noise: Tensor, cond: TextEmbedding, uncond: TextEmbedding, spec: SampleSpec, callback: Callback | None
    ) -> Tensor: ...

    def fingerprint(self) -> str: ...


class Autoencoder(Protocol):
    downscale: int
    latent_channels: int

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def fingerprint(self) -> str: ...
