"""In-process implementations of the capability protocols (embedded mode and development)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from kinema.errors import InvalidInput
from kinema.nn.autoencoder import Autoencoder
from kinema.nn.mmdit import MMDiT
from kinema.nn.text import TextEmbedding
from kinema.pipelines.protocols import SampleSpec, VideoSpec
from kinema.pipelines.student import StudentFacts, resolve_timesteps
from kinema.sampling.edit import sample_masked, start_latents
from kinema.sampling.guidance import cfg_velocity
from kinema.sampling.samplers import Callback, sample_euler, sample_heun
from kinema.sampling.schedule import get_schedule
from kinema.sampling.student import sample_student

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


class LocalStudent:
    """The few-step loop of a distilled student (`kinema.sampling.student.sample_student`, fresh noise between steps,
    no guidance) in this process around a velocity network.

    Embedded mode passes the student's MMDiT; the distill service passes a network that calls Triton once per step,
    so the loop exists once.
    """

    def __init__(self, model: MMDiT | VelocityNetwork, sha256: str, facts: StudentFacts,
                 latent_channels: int | None = None) -> None:  # fmt: skip
        self.model = model
        self.facts = facts
        self.default_steps = facts.steps
        self.latent_channels = latent_channels or model.params.in_channels
        self._sha256 = sha256

    def fingerprint(self) -> str:
        return self._sha256

    @torch.inference_mode()
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
    ) -> Tensor:
        schedule = [*resolve_timesteps(self.facts.steps, steps, timesteps), 0.0]
        b = noise.shape[0]
        if seeds and (len(seeds) != b or seed):
            raise InvalidInput(f"seeds: give one per row ({b}) and leave seed 0, got {len(seeds)} and seed {seed}",
                               reason="INVALID_SHAPE", field="seeds")  # fmt: skip
        if cond.tokens.shape[0] != b:
            raise InvalidInput(f"cond has {cond.tokens.shape[0]} rows for a batch of {b}", reason="INVALID_SHAPE",
                               field="cond")  # fmt: skip
        generator = [torch.Generator().manual_seed(s) for s in seeds] if seeds else torch.Generator().manual_seed(seed)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return self.model(x, t, cond.tokens, cond.pooled, cond.mask)

        return sample_student(velocity, noise, schedule, callback=callback, generator=generator)


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


class VideoNetwork(Protocol):
    """A video velocity network (`kinema.nn.video.VideoMMDiT` in process, or a Triton client with its interface):
    the call `VideoMMDiT.forward` makes and `reference`, which maps a reference latent to content."""

    params: Any

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, context_mask: Tensor | None = None, *,
                 structure: Tensor | None = None, structure_level: Tensor | None = None,
                 temporal: bool = True) -> Tensor: ...  # fmt: skip

    def reference(self, latent: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...


class LocalVideoDenoiser:
    """The video sampling loop (`kinema.sampling.temporal`: classifier-free and temporal guidance, structure at a
    fidelity level, window blending) in this process around a video network; embedded mode passes the VideoMMDiT."""

    def __init__(self, model: VideoNetwork, sha256: str) -> None:
        self.model = model
        self.latent_channels = model.params.in_channels
        self.max_frames = model.params.max_frames
        self._sha256 = sha256

    def fingerprint(self) -> str:
        return self._sha256

    @torch.inference_mode()
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
    ) -> Tensor:
        from kinema.nn.video import branch_predictor, degrade_structure
        from kinema.pipelines.edit_video import resolve_window
        from kinema.sampling.temporal import sample_video
        from kinema.sampling.windows import cycling, window_plans, windowed_predictor

        b, f = noise.shape[:2]
        window = resolve_window(f, window, overlap, self.max_frames)
        if isinstance(content, TextEmbedding):
            cond = (content.tokens, content.mask, content.pooled)
        else:  # a reference frame's latent (B, C, h, w)
            cond = self.model.reference(content)
        null = (uncond.tokens, uncond.mask, uncond.pooled)
        level = torch.full((b,), float(spec.structure_level))
        degraded = degrade_structure(structure, level)  # (B, F, 1, h, w)
        plans = [windowed_predictor([((s, e), branch_predictor(self.model, cond, null, degraded[:, s:e], level))
                                     for s, e in plan], f)
                 for plan in window_plans(f, window, overlap)]  # fmt: skip
        schedule = get_schedule(spec.steps, spec.shift)[spec.start_step :]
        return sample_video(cycling(plans), noise, schedule, guidance=spec.guidance,
                            temporal_guidance=spec.temporal_guidance, init_latents=init_latents,
                            callback=callback)  # fmt: skip


class LocalDepth:
    """Monocular depth in this process (`kinema.nn.depth.estimate`)."""

    def __init__(self, model: Any, sha256: str) -> None:
        self.model = model
        self._sha256 = sha256

    def fingerprint(self) -> str:
        return self._sha256

    @torch.inference_mode()
    def estimate(self, images: Tensor) -> Tensor:
        from kinema.nn.depth import estimate

        return estimate(self.model, images)


def load_local_video(models: Path | None = None):
    """(text encoder, depth estimator, video denoiser, autoencoder) from a model repository, for `edit_video`.

    Sets this process's malloc thresholds for repeated forward passes (`kinema.inference.allocator`)."""
    from kinema.inference.allocator import retain_freed_memory
    from kinema.repository import (
        default_models_dir,
        load_autoencoder,
        load_depth,
        load_text_encoder_default,
        load_video_denoiser,
    )

    retain_freed_memory()
    models = models or default_models_dir()
    return (
        load_text_encoder_default(),
        LocalDepth(*load_depth(models)),
        LocalVideoDenoiser(*load_video_denoiser(models)),
        LocalAutoencoder(*load_autoencoder(models)),
    )


def load_local(models: Path | None = None, denoiser: str = "denoiser"):
    """(text encoder, denoiser, autoencoder) from a model repository, ready for `text_to_image`.

    `denoiser` names the repository's denoiser model; a distilled student (its config has `student_steps`) comes
    as a `LocalStudent`, which `text_to_image` samples with the few-step sampler. Sets this process's malloc
    thresholds for repeated forward passes (`kinema.inference.allocator`), as every process that runs networks does.
    """
    from kinema.inference.allocator import retain_freed_memory
    from kinema.repository import (
        default_models_dir,
        load_autoencoder,
        load_denoiser,
        load_text_encoder_default,
        model_parameters,
    )

    retain_freed_memory()
    models = models or default_models_dir()
    facts = StudentFacts.from_parameters(model_parameters(models, denoiser))
    model, sha = load_denoiser(models, name=denoiser)
    sampler = LocalStudent(model, sha, facts) if facts else LocalDenoiser(model, sha)
    autoencoder = LocalAutoencoder(*load_autoencoder(models))
    return load_text_encoder_default(), sampler, autoencoder
