"""Judge a text-to-image stack on held-out prompts: attribute accuracy (probe), FID, val flow loss."""

from __future__ import annotations

import time

import numpy as np
import torch

from kinema.data import World
from kinema.eval.scoring import Truth, evaluate
from kinema.nn.text import TextEmbedding
from kinema.pipelines import TextToImageRequest, text_to_image
from kinema.pipelines.protocols import Autoencoder, Denoiser, TextEncoder


def held_out_prompts(n: int, split: str = "test", world: World | None = None) -> tuple[list[str], list[Truth]]:
    """Captions of the first `n` scenes of `split` and what each asks for."""
    world = world or World()
    samples = [world.sample(split, i) for i in range(n)]
    return [s.caption for s in samples], [Truth.from_sample(s) for s in samples]


def generate_images(
    prompts: list[str],
    text_encoder: TextEncoder,
    denoiser: Denoiser,
    autoencoder: Autoencoder,
    *,
    steps: int,
    guidance: float,
    seed: int = 0,
    batch: int = 32,
    sampler: str = "euler",
    shift: float = 1.0,
) -> np.ndarray:
    """(N, H, W, 3) uint8; prompt i is drawn with seed + i whatever the batching."""
    out = []
    for i in range(0, len(prompts), batch):
        req = TextToImageRequest(prompts=prompts[i : i + batch], seed=seed + i, steps=steps, guidance=guidance,
                                 sampler=sampler, shift=shift)  # fmt: skip
        out.append(text_to_image(req, text_encoder, denoiser, autoencoder).images)
    return np.concatenate(out)


def evaluate_text_to_image(
    text_encoder: TextEncoder,
    denoiser: Denoiser,
    autoencoder: Autoencoder,
    *,
    n: int = 500,
    steps: int = 28,
    guidance: float = 4.0,
    seed: int = 0,
    split: str = "test",
    fid_reference: int = 2000,
    with_fid: bool = True,
    sampler: str = "euler",
    shift: float = 1.0,
) -> dict:
    """Attribute accuracy and FID of `n` images generated from held-out captions with the given sampling settings."""
    from kinema.eval.probe import Probe

    prompts, truths = held_out_prompts(n, split)
    t0 = time.perf_counter()
    images = generate_images(prompts, text_encoder, denoiser, autoencoder, steps=steps, guidance=guidance, seed=seed,
                             sampler=sampler, shift=shift)  # fmt: skip
    gen_seconds = time.perf_counter() - t0
    result = {"accuracy": evaluate(Probe.from_file(), images, truths), "generation_seconds": round(gen_seconds, 1)}
    if with_fid:
        from kinema.eval.fid import fid_against, real_floor, reference_stats

        result["fid"] = fid_against(images, reference_stats(split=split, n=fid_reference))
        result["fid_reference_images"] = fid_reference
        # The same n of real renders (validation split) against the same reference: FID's small-n floor.
        result["fid_real_renders_same_n"] = real_floor(n, split, fid_reference)
    result.update({"n": n, "steps": steps, "guidance": guidance, "sampler": sampler, "shift": shift, "seed": seed,
                   "split": split})  # fmt: skip
    return result


@torch.no_grad()
def validation_set(autoencoder, text_encoder, n: int = 256, split: str = "val") -> tuple[torch.Tensor, TextEmbedding]:
    """The held-out latents (n, C, h, w) and text states of `validation_flow_loss`, to score many models on."""
    from kinema.train.autoencoder import to_tensor

    images, captions = World().images(split, 0, n)
    x0 = torch.cat([autoencoder.encode(to_tensor(images[i : i + 128])) for i in range(0, n, 128)])
    return x0, text_encoder.encode(captions)


@torch.no_grad()
def validation_flow_loss(
    denoiser_model, autoencoder, text_encoder, n: int = 256, split: str = "val",
    data: tuple[torch.Tensor, TextEmbedding] | None = None,
) -> dict:  # fmt: skip
    """SD3's validation protocol: flow-matching loss on a fixed t grid over held-out latents (`data`: a
    `validation_set` made before, else made here)."""
    from kinema.eval.metrics import flow_matching_val_loss

    x0, emb = data if data is not None else validation_set(autoencoder, text_encoder, n, split)

    def velocity(x, t, cond):
        return denoiser_model(x, t, emb.tokens, emb.pooled, emb.mask)

    return flow_matching_val_loss(velocity, x0)
