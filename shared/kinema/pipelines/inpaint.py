"""Inpainting: regenerate the masked part of an image and keep the rest (latent inpainting with the blend of
`kinema.sampling.edit.sample_masked`; LDM, Rombach et al. 2022), over the image-to-image code path."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import reduce
from torch import Tensor

from kinema.errors import InvalidInput
from kinema.pipelines.image_to_image import ImageToImageRequest, check_image, check_strength, edit
from kinema.pipelines.protocols import Autoencoder, Denoiser, TextEncoder
from kinema.pipelines.text_to_image import TextToImageResult, check_sampling
from kinema.sampling.samplers import Callback

MASK_THRESHOLD = 128  # mask pixels >= this are regenerated, those below kept (orchestrator.proto, inputs "mask")


@dataclass(frozen=True)
class InpaintRequest:
    """Every prompt repaints `image` (H, W, 3) uint8 where `mask` (H, W) uint8 is >= 128."""

    prompts: list[str]
    image: np.ndarray
    mask: np.ndarray
    strength: float = 1.0
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
        mask = self.mask
        if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.ndim != 2:
            raise InvalidInput(f"mask must be an (H, W) uint8 array, got {getattr(mask, 'shape', None)}",
                               reason="INVALID_SHAPE", field="mask")  # fmt: skip
        if mask.shape != self.image.shape[:2]:
            (mh, mw), (ih, iw) = mask.shape, self.image.shape[:2]
            raise InvalidInput(f"mask is {mw}x{mh} pixels, the image {iw}x{ih}: they must be the same size",
                               reason="SIZE_MISMATCH", field="mask")  # fmt: skip


def latent_mask(mask: np.ndarray, factor: int) -> Tensor:
    """(H, W) uint8 pixel mask -> (1, 1, H/f, W/f) float32 latent mask, 1 = generate.

    A latent cell is regenerated when any pixel of its f x f block is (max-pooling), so every masked pixel is
    regenerated and the kept latents cover only kept pixels.
    """
    pixels = torch.from_numpy((mask >= MASK_THRESHOLD).astype(np.float32))  # (H, W)
    cells = reduce(pixels, "(h f1) (w f2) -> h w", "max", f1=factor, f2=factor)  # (h, w)
    return cells[None, None].contiguous()  # (1, 1, h, w)


def inpaint(
    request: InpaintRequest,
    text_encoder: TextEncoder,
    denoiser: Denoiser,
    autoencoder: Autoencoder,
    callback: Callback | None = None,
) -> TextToImageResult:
    """Output i uses seed + i. Outside the mask the sampled latents end as the image's own (decoded: the image
    as the autoencoder reconstructs it); inside, strength 1 samples from pure noise and a lower strength starts
    from the image noised part-way (SDEdit). Reproduces bit for bit on CPU, as text_to_image."""
    request.validate(patch=autoencoder.downscale * 2)
    base = ImageToImageRequest(
        prompts=request.prompts, image=request.image, strength=request.strength, seed=request.seed,
        steps=request.steps, guidance=request.guidance, sampler=request.sampler, shift=request.shift,
        negative_prompt=request.negative_prompt,
    )  # fmt: skip
    return edit(base, text_encoder, denoiser, autoencoder, callback, latent_mask(request.mask, autoencoder.downscale))
