"""In-process implementations of the capability protocols (embedded mode and development)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from kinema.nn.autoencoder import Autoencoder
from kinema.nn.mmdit import MMDiT
from kinema.nn.text import TextEmbedding
from kinema.pipelines.protocols import SampleSpec
from kinema.sampling.edit import sample_masked, start_latents
from kinema.sampling.guidance import cfg_velocity
from kinema.sampling.samplers import Callback, sample_euler, sample_heun
from kinema.sampling.schedule import get_schedule

SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def _pad_to(e: TextEmbedding, length: int) -> tuple[Tensor, Tensor]:
    pad = length - e.tokens.shape[1]
    tokens = torch.nn.functional.pad(e.tokens, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(e.mask, (0, pad))
    return tokens, mask


class VelocityNetwork(Protocol):
    """One network evaluation v(x_t, t | text): an MMDiT in process, or a call to Triton's denoiser model."""

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, context_mask: Tensor) -> Tensor: ...


class LocalDenoiser:
    """The sampling loop (schedule, sampler, classifier-free guidance) in this process around a velocity network.

    Embedded mode passes the MMDiT itself; the denoiser service passes a network that calls Triton once per
    step, so the loop exists once.
    """

    def __init__(self, model: MMDiT | VelocityNetwork, sha256: str, latent_channels: int | None = None) -> None:
        self.model = model
        self.latent_channels = latent_channels or model.params.in_channels
        self._sha256 = sha256

    def fingerprint(self) -> str:
        return self._sha256

    @torch.inference_mode()
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
    ) -> Tensor:
        b = noise.shape[0]
        length = max(cond.tokens.shape[1], uncond.tokens.shape[1])
        c_tok, c_mask = _pad_to(cond, length)
        u_tok, u_mask = _pad_to(uncond, length)
        guided = spec.guidance != 1.0
        if guided:  # one batched evaluation for both halves of CFG
            tokens = torch.cat([c_tok, u_tok.expand(b, -1, -1)])
            token_mask = torch.cat([c_mask, u_mask.expand(b, -1)])
            pooled = torch.cat([cond.pooled, uncond.pooled.expand(b, -1)])
        else:
            tokens, token_mask, pooled = c_tok, c_mask, cond.pooled

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            if not guided:
                return self.model(x, t, tokens, pooled, token_mask)
            v = self.model(torch.cat([x, x]), torch.cat([t, t]), tokens, pooled, token_mask)
            v_cond, v_uncond = v.chunk(2)
            return cfg_velocity(v_cond, v_uncond, spec.guidance)

        schedule = get_schedule(spec.steps, spec.shift)[spec.start_step :]
        sampler = SAMPLERS[spec.sampler]
        if spec.start_step and init_latents is None:
            raise ValueError("a run that skips steps needs init_latents to start from")
        x = start_latents(noise, schedule[0], init_latents)
        if mask is None:
            return sampler(velocity, x, schedule, callback=callback)
        if init_latents is None:
            raise ValueError("a mask needs init_latents: the latents it keeps")
        return sample_masked(sampler, velocity, x, schedule, known=init_latents, noise=noise, mask=mask,
                             callback=callback)  # fmt: skip


class LocalAutoencoder:
    def __init__(self, model: Autoencoder, sha256: str) -> None:
        self.model = model
        self.downscale = model.params.downscale
        self.latent_channels = model.params.latent_channels
        self._sha256 = sha256

    def fingerprint(self) -> str:
        return self._sha256

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        return self.model.encode(images)

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        return self.model.decode(latents)


def load_local(models: Path | None = None):
    """(text encoder, denoiser, autoencoder) from a model repository, ready for `text_to_image`."""
    from kinema.repository import default_models_dir, load_autoencoder, load_denoiser, load_text_encoder_default

    models = models or default_models_dir()
    denoiser = LocalDenoiser(*load_denoiser(models))
    autoencoder = LocalAutoencoder(*load_autoencoder(models))
    return load_text_encoder_default(), denoiser, autoencoder
