"""Image-to-image: encode an image, noise it part-way along the flow and sample the rest of the schedule
(SDEdit, Meng et al. 2021, on SD3's rectified flow). `kinema.pipelines.inpaint` runs the same code with a mask."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kinema.errors import InvalidInput
from kinema.pipelines.protocols import Autoencoder, Denoiser, SampleSpec, TextEncoder, is_student
from kinema.pipelines.text_to_image import (
    TextToImageResult,
    check_sampling,
    check_side,
    encode_with_negative,
    finish,
)
from kinema.sampling.edit import start_step
from kinema.sampling.samplers import Callback, initial_noise


@dataclass(frozen=True)
class ImageToImageRequest:
    """Every prompt edits the same `image`, (H, W, 3) uint8 RGB; H and W are the output's size."""

    prompts: list[str]
    image: np.ndarray
    strength: float = 0.8
    seed: int = 0
    steps: int = 28
    guidance: float = 4.0
    sampler: str = "euler"
    shift: float = 1.0
    negative_prompt: str = ""

    def validate(self, patch: int) -> None:
        check_sampling(self)
        check_strength(self.strength)
        check_image(self.image, patch)


def check_strength(strength: float) -> None:
    if not (math.isfinite(strength) and 0 < strength <= 1):
        raise InvalidInput(f"strength must be in (0, 1], got {strength}", reason="OUT_OF_RANGE", field="strength")


def check_image(image: np.ndarray, patch: int, field: str = "image") -> None:
    """An (H, W, 3) uint8 image whose sides the denoiser can sample."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise InvalidInput(f"{field} must be an (H, W, 3) uint8 RGB array, got {shape}", reason="INVALID_SHAPE",
                           field=field)  # fmt: skip
    height, width = image.shape[:2]
    for side in (width, height):
        try:
            check_side(side, patch, field)
        except InvalidInput as e:
            raise InvalidInput(f"{field} is {width}x{height} pixels: {e}", reason="OUT_OF_RANGE", field=field,
                               metadata={"patch": str(patch)}) from None  # fmt: skip


def to_pixels(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1], the autoencoder's input range."""
    return (
        torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    )  # (1, 3, H, W)


def edit(
    request: ImageToImageRequest,
    text_encoder: TextEncoder,
    denoiser: Denoiser,
    autoencoder: Autoencoder,
    callback: Callback | None,
    mask: Tensor | None = None,
) -> TextToImageResult:
    """image_to_image, or inpaint with `mask` (1, 1, h, w) in latent space (1 = generate); request validated."""
    if is_student(denoiser):
        raise InvalidInput("image_to_image and inpaint start part-way along the teacher's schedule: they need a full "
                           "denoiser, not a few-step distilled student", reason="NOT_FOR_STUDENT",
                           field="denoiser")  # fmt: skip
    cond, uncond = encode_with_negative(text_encoder, request.prompts, request.negative_prompt)
    b = len(request.prompts)
    init = autoencoder.encode(to_pixels(request.image))  # (1, C, h, w): one image for every prompt
    init = init.expand(b, -1, -1, -1).contiguous()  # (B, C, h, w)
    seeds = [request.seed + i for i in range(b)]
    noise = torch.cat([initial_noise((1, *init.shape[1:]), s) for s in seeds])  # (B, C, h, w)
    spec = SampleSpec(steps=request.steps, guidance=request.guidance, sampler=request.sampler, shift=request.shift,
                      start_step=start_step(request.steps, request.strength))  # fmt: skip
    latents = denoiser.sample(noise, cond, uncond, spec, callback, init_latents=init, mask=mask)
    return finish(latents, seeds, cond.truncated, text_encoder, denoiser, autoencoder)


def image_to_image(
    request: ImageToImageRequest,
    text_encoder: TextEncoder,
    denoiser: Denoiser,
    autoencoder: Autoencoder,
    callback: Callback | None = None,
) -> TextToImageResult:
    """Output i uses seed + i and has the input's size; it runs the last ceil(strength * steps) of `steps` steps
    (the callback's n), so strength 1 samples from pure noise and strength near 0 returns nearly the input as the
    autoencoder reconstructs it. Reproduces bit for bit on CPU, as text_to_image."""
    request.validate(patch=autoencoder.downscale * 2)
    return edit(request, text_encoder, denoiser, autoencoder, callback)
