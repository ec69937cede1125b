"""image_to_image and inpaint in process with the shipped models: seeds reproduce bit for bit, strength 1 is
text-to-image, a small strength keeps the image, inpainting keeps the unmasked latents exactly; bad requests name
their field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kinema.errors import InvalidInput
from kinema.pipelines import (
    ImageToImageRequest,
    InpaintRequest,
    TextToImageRequest,
    image_to_image,
    inpaint,
    text_to_image,
)
from kinema.pipelines.image_to_image import to_pixels
from kinema.pipelines.inpaint import latent_mask
from kinema.pipelines.local import load_local

STEPS = 8


class Recorded:
    """A Denoiser that keeps what it was given and returned."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    @property
    def latent_channels(self) -> int:
        return self.inner.latent_channels

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def sample(self, noise, cond, uncond, spec, callback, **edit):
        latents = self.inner.sample(noise, cond, uncond, spec, callback, **edit)
        self.calls.append((spec, edit, latents))
        return latents


@pytest.fixture(scope="module")
def stack():
    return load_local()


@pytest.fixture(scope="module")
def picture(stack) -> np.ndarray:
    return text_to_image(TextToImageRequest(prompts=["a red sphere left of a blue cube"], steps=STEPS, seed=1),
                         *stack).images[0]  # fmt: skip


def reconstruction(stack, image: np.ndarray) -> np.ndarray:
    _, _, ae = stack
    pixels = ae.decode(ae.encode(to_pixels(image)))
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def mean_error(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    d = np.abs(a.astype(float) - b.astype(float))
    return float(d[where].mean() if where is not None else d.mean())


def test_image_to_image_reproduces_and_strength_moves_away_from_the_input(stack, picture) -> None:
    def run(strength: float, seed: int = 2, n: int = 1):
        request = ImageToImageRequest(prompts=["a green cone"] * n, image=picture, strength=strength, steps=STEPS,
                                      seed=seed)  # fmt: skip
        return image_to_image(request, *stack)

    a, b = run(0.6, n=2), run(0.6, n=2)
    np.testing.assert_array_equal(a.images, b.images)  # bit for bit
    assert a.images.shape == (2, 64, 64, 3) and a.seeds == [2, 3] and set(a.models) == {"text_encoder", "denoiser",
                                                                                       "autoencoder"}  # fmt: skip
    recon = reconstruction(stack, picture)
    errors = [mean_error(run(s).images[0], recon) for s in (0.1, 0.4, 0.7, 1.0)]
    assert errors[0] < 3.0  # one step from a barely noised image: the input as the autoencoder reconstructs it
    assert errors == sorted(errors) and errors[-1] > 4 * errors[0]  # further from the input as strength grows


def test_strength_one_is_text_to_image_bit_for_bit(stack, picture) -> None:
    edit = image_to_image(ImageToImageRequest(prompts=["a green cone"], image=picture, strength=1.0, steps=STEPS,
                                              seed=4), *stack)  # fmt: skip
    plain = text_to_image(TextToImageRequest(prompts=["a green cone"], steps=STEPS, seed=4), *stack)
    np.testing.assert_array_equal(edit.images, plain.images)


def test_the_callback_counts_the_steps_strength_leaves(stack, picture) -> None:
    seen = []
    request = ImageToImageRequest(prompts=["a cube"], image=picture, strength=0.5, steps=STEPS)
    image_to_image(request, *stack, callback=lambda i, n, x: seen.append((i, n)))
    assert seen == [(i, 4) for i in range(4)]


def test_inpaint_keeps_the_unmasked_latents_and_regenerates_the_mask(stack, picture) -> None:
    te, dn, ae = stack
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    recorded = Recorded(dn)
    request = InpaintRequest(prompts=["a yellow cone"], image=picture, mask=mask, steps=STEPS, seed=7)
    out = inpaint(request, te, recorded, ae)
    np.testing.assert_array_equal(out.images, inpaint(request, te, dn, ae).images)  # bit for bit
    (spec, edit, latents), = recorded.calls  # fmt: skip
    f = ae.downscale
    assert spec.start_step == 0 and edit["mask"].shape == (1, 1, 64 // f, 64 // f)
    keep = edit["mask"][0, 0] == 0  # (h, w)
    torch.testing.assert_close(latents[0][:, keep], edit["init_latents"][0][:, keep], rtol=0, atol=0)
    kept = np.kron(keep.numpy(), np.ones((f, f))).astype(bool)  # the pixels of kept latent cells
    recon = reconstruction(stack, picture)
    # Kept cells decode to the reconstruction up to the decoder's reach across the mask's edge; the mask changes.
    assert mean_error(out.images[0], recon, kept) < 3.0
    assert mean_error(out.images[0], recon, ~kept) > 5 * mean_error(out.images[0], recon, kept)


def test_latent_mask_regenerates_every_cell_a_masked_pixel_touches() -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[0, 0] = 128
    mask[9, 12] = 255
    mask[4, 4] = 127  # below the threshold: kept
    cells = latent_mask(mask, 8)
    assert cells.shape == (1, 1, 2, 2) and cells[0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"strength": 0.0}, "strength"),
        ({"strength": 1.5}, "strength"),
        ({"strength": float("nan")}, "strength"),
        ({"image": np.zeros((60, 64, 3), np.uint8)}, "image"),
        ({"image": np.zeros((64, 64), np.uint8)}, "image"),
        ({"mask": np.zeros((32, 64), np.uint8)}, "mask"),
        ({"mask": np.zeros((64, 64, 3), np.uint8)}, "mask"),
        ({"steps": 0}, "steps"),
        ({"prompts": []}, "prompts"),
    ],
)
def test_bad_requests_name_their_field(stack, picture, change, field) -> None:
    fields = {"prompts": ["a cube"], "image": picture, "mask": np.zeros((64, 64), np.uint8), "steps": 2} | change
    with pytest.raises(InvalidInput) as info:
        inpaint(InpaintRequest(**fields), *stack)
    assert info.value.field == field
    if field != "mask":
        fields.pop("mask")
        with pytest.raises(InvalidInput) as info:
            image_to_image(ImageToImageRequest(**fields), *stack)
        assert info.value.field == field
