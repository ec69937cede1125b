"""Text-to-image: encode the prompt, sample latents with the denoiser, decode (SD3 inference)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kinema.errors import InvalidInput
from kinema.pipelines.protocols import Autoencoder, Denoiser, SampleSpec, TextEncoder
from kinema.sampling.samplers import Callback, initial_noise

MAX_SIZE = 256


@dataclass(frozen=True)
class TextToImageRequest:
    prompts: list[str]
    seed: int = 0
    steps: int = 28
    guidance: float = 4.0
    size: int = 64
    sampler: str = "euler"
    shift: float = 1.0
    negative_prompt: str = ""

    def validate(self, patch: int) -> None:
        if not self.prompts:
            raise InvalidInput("at least one prompt is required", reason="MISSING", field="prompts")
        if self.steps < 1:
            raise InvalidInput(f"steps must be >= 1, got {self.steps}", reason="OUT_OF_RANGE", field="steps")
        if self.steps > 1000:
            raise InvalidInput(f"steps must be <= 1000, got {self.steps}", reason="OUT_OF_RANGE", field="steps")
        if not np.isfinite(self.guidance) or self.guidance < 0:
            raise InvalidInput(
                f"guidance must be a finite number >= 0, got {self.guidance}", reason="OUT_OF_RANGE", field="guidance"
            )
        if self.size % patch or not patch <= self.size <= MAX_SIZE:
            raise InvalidInput(
                f"size must be a multiple of {patch} between {patch} and {MAX_SIZE}, got {self.size}",
                reason="OUT_OF_RANGE",
                field="size",
            )
        if self.sampler not in ("euler", "heun"):
            raise InvalidInput(
                f"sampler must be 'euler' or 'heun', got {self.sampler!r}", reason="OUT_OF_RANGE", field="sampler"
            )
        if self.shift <= 0:
            raise InvalidInput(f"shift must be > 0, got {self.shift}", reason="OUT_OF_RANGE", field="shift")
        if not 0 <= self.seed < 2**63:
            raise InvalidInput(f"seed must be in [0, 2**63), got {self.seed}", reason="OUT_OF_RANGE", field="seed")


@dataclass(frozen=True)
class TextToImageResult:
    images: np.ndarray  # (B, H, W, 3) uint8
    seeds: list[int]
    truncated: list[bool]  # prompt i was cut at the text encoder's token limit
    models: dict[str, str] = field(default_factory=dict)  # name -> sha256


def text_to_image(
    request: TextToImageRequest,
    text_encoder: TextEncoder,
    denoiser: Denoiser,
    autoencoder: Autoencoder,
    callback: Callback | None = None,
) -> TextToImageResult:
    """Image i uses seed + i: the same request reproduces bit for bit on CPU, and an image does not
    depend on how many were asked for (beyond float rounding that differs between batch sizes)."""
    request.validate(patch=autoencoder.downscale * 2)
    cond = text_encoder.encode(request.prompts)
    uncond = text_encoder.encode([request.negative_prompt])
    h = request.size // autoencoder.downscale
    seeds = [request.seed + i for i in range(len(request.prompts))]
    noise = torch.cat([initial_noise((1, denoiser.latent_channels, h, h), s) for s in seeds])  # (B, C, h, w)
    spec = SampleSpec(steps=request.steps, guidance=request.guidance, sampler=request.sampler, shift=request.shift)
    latents = denoiser.sample(noise, cond, uncond, spec, callback)
    pixels = autoencoder.decode(latents)  # (B, 3, H, W) in [-1, 1]
    images = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    models = {
        "text_encoder": text_encoder.fingerprint(),
        "denoiser": denoiser.fingerprint(),
        "autoencoder": autoencoder.fingerprint(),
    }
    return TextToImageResult(images=images, seeds=seeds, truncated=list(cond.truncated), models=models)
