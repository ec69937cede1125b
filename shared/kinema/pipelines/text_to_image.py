"""Text-to-image: encode the prompt, sample latents with the denoiser, decode (SD3 inference).

The denoiser may be a few-step student (LADD): the same pipeline then samples with the student's few-step sampler,
without classifier-free guidance (`kinema.pipelines.protocols.Student`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kinema.errors import InvalidInput
from kinema.nn.text import TextEmbedding
from kinema.pipelines.protocols import Autoencoder, Denoiser, SampleSpec, Student, TextEncoder, is_student
from kinema.pipelines.student import renoise_seeds, resolve_timesteps
from kinema.sampling.samplers import Callback, initial_noise

MAX_SIZE = 256
PROMPT_LIMIT_SETTING = "KINEMA_MAX_PROMPT_CHARS"  # kinema.rpc.settings.ServiceSettings.max_prompt_chars


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
        check_sampling(self)
        check_side(self.size, patch, "size")


def check_side(side: int, patch: int, field: str) -> None:
    """An image side the denoiser can sample: a multiple of its pixel patch within MAX_SIZE."""
    if side % patch or not patch <= side <= MAX_SIZE:
        raise InvalidInput(
            f"{field} must be a multiple of {patch} between {patch} and {MAX_SIZE}, got {side}",
            reason="OUT_OF_RANGE",
            field=field,
        )


def check_prompts(prompts: Sequence[str], limit: int, negative_prompt: str = "") -> None:
    """Every prompt and the negative prompt at most `limit` characters (Unicode code points, not bytes).

    The servers' bound on the text a request carries (the text encoder service and the orchestrator, for every
    pipeline), far above the encoder's token limit, beyond which a prompt is still cut and flagged `truncated`.
    """
    named = [(f"prompts[{i}]", p) for i, p in enumerate(prompts)] + [("negative_prompt", negative_prompt)]
    for name, text in named:
        if len(text) > limit:
            raise InvalidInput(
                f"{name} has {len(text)} characters, over this server's limit of {limit} ({PROMPT_LIMIT_SETTING}); "
                f"shorten it to at most {limit} characters (the text encoder reads only up to its token limit anyway)",
                reason="PROMPT_TOO_LONG",
                field=name,
                metadata={"limit": str(limit), "length": str(len(text)), "setting": PROMPT_LIMIT_SETTING},
            )


def check_sampling(r: Any) -> None:
    """The checks every image pipeline's request shares: prompts, seed, steps, guidance, sampler, shift."""
    if not r.prompts:
        raise InvalidInput("at least one prompt is required", reason="MISSING", field="prompts")
    if r.steps < 1:
        raise InvalidInput(f"steps must be >= 1, got {r.steps}", reason="OUT_OF_RANGE", field="steps")
    if r.steps > 1000:
        raise InvalidInput(f"steps must be <= 1000, got {r.steps}", reason="OUT_OF_RANGE", field="steps")
    if not np.isfinite(r.guidance) or r.guidance < 0:
        raise InvalidInput(
            f"guidance must be a finite number >= 0, got {r.guidance}", reason="OUT_OF_RANGE", field="guidance"
        )
    if r.sampler not in ("euler", "heun"):
        raise InvalidInput(f"sampler must be 'euler' or 'heun', got {r.sampler!r}", reason="OUT_OF_RANGE",
                           field="sampler")  # fmt: skip
    if not r.shift > 0:
        raise InvalidInput(f"shift must be > 0, got {r.shift}", reason="OUT_OF_RANGE", field="shift")
    if not 0 <= r.seed < 2**63:
        raise InvalidInput(f"seed must be in [0, 2**63), got {r.seed}", reason="OUT_OF_RANGE", field="seed")


def sampling_defaults(denoiser: Denoiser | Student) -> tuple[int, float]:
    """(steps, guidance) for a request that leaves them unset: a student's distilled steps without guidance, else
    the teacher's 28 guided steps (the request's defaults). Callers that know which fields were set use this."""
    if is_student(denoiser):
        return denoiser.default_steps, 1.0
    return TextToImageRequest.steps, TextToImageRequest.guidance


def check_student(r: Any, student: Student) -> None:
    """A request a few-step student can run: its steps, no guidance, no negative prompt, the default sampler."""
    resolve_timesteps(student.default_steps, r.steps)
    for name, value, ok in (("guidance", r.guidance, 1.0), ("sampler", r.sampler, "euler"), ("shift", r.shift, 1.0),
                            ("negative_prompt", r.negative_prompt, "")):  # fmt: skip
        if value != ok:
            raise InvalidInput(
                f"the denoiser is a few-step distilled student: it samples without classifier-free guidance on its own "
                f"schedule, so {name} must be unset or {ok!r}, got {value!r}",
                reason="NOT_FOR_STUDENT",
                field=name,
            )


@dataclass(frozen=True)
class TextToImageResult:
    images: np.ndarray  # (B, H, W, 3) uint8
    seeds: list[int]
    truncated: list[bool]  # prompt i was cut at the text encoder's token limit
    models: dict[str, str] = field(default_factory=dict)  # name -> sha256


def text_to_image(
    request: TextToImageRequest,
    text_encoder: TextEncoder,
    denoiser: Denoiser | Student,
    autoencoder: Autoencoder,
    callback: Callback | None = None,
) -> TextToImageResult:
    """Image i uses seed + i: the same request reproduces bit for bit on CPU, and an image does not
    depend on how many were asked for (beyond float rounding that differs between batch sizes). A student
    re-noises image i between steps from its own stream (`renoise_seeds`), so that holds for it too."""
    request.validate(patch=autoencoder.downscale * 2)
    student = is_student(denoiser)
    if student:  # no guidance: no negative prompt to encode
        check_student(request, denoiser)
        cond = text_encoder.encode(request.prompts)
    else:
        cond, uncond = encode_with_negative(text_encoder, request.prompts, request.negative_prompt)
    h = request.size // autoencoder.downscale
    seeds = [request.seed + i for i in range(len(request.prompts))]
    noise = torch.cat([initial_noise((1, denoiser.latent_channels, h, h), s) for s in seeds])  # (B, C, h, w)
    if student:
        latents = denoiser.sample_few(noise, cond, callback, steps=request.steps, seeds=renoise_seeds(seeds))
    else:
        spec = SampleSpec(steps=request.steps, guidance=request.guidance, sampler=request.sampler,
                          shift=request.shift)  # fmt: skip
        latents = denoiser.sample(noise, cond, uncond, spec, callback)
    return finish(latents, seeds, cond.truncated, text_encoder, denoiser, autoencoder)


def encode_with_negative(
    text_encoder: TextEncoder, prompts: list[str], negative: str
) -> tuple[TextEmbedding, TextEmbedding]:
    """(cond, uncond): the prompts' embeddings and the negative prompt's, from one encoder call.

    One forward pass over B + 1 prompts instead of two (16 against 20 ms for one prompt on 1 thread here), and in the
    distributed shape one round trip to the text encoder service instead of two. The rows are those two calls would
    give, up to float rounding (uncond padded to the batch's token length, masked). An encoder that refuses B + 1
    prompts as over its batch limit (a service's KINEMA_MAX_BATCH, which a full batch of prompts reaches) is asked
    twice instead.
    """
    try:
        both = text_encoder.encode([*prompts, negative])
    except InvalidInput as e:
        if e.reason != "BATCH_TOO_LARGE":
            raise
        return text_encoder.encode(prompts), text_encoder.encode([negative])
    n = len(prompts)
    return both.rows(0, n), both.rows(n, n + 1)


def finish(
    latents: Tensor,
    seeds: list[int],
    truncated: list[bool],
    text_encoder: TextEncoder,
    denoiser: Denoiser | Student,
    autoencoder: Autoencoder,
) -> TextToImageResult:
    """Decode sampled latents (B, C, h, w) to uint8 images and name the models that ran (every image pipeline)."""
    pixels = autoencoder.decode(latents)  # (B, 3, H, W) in [-1, 1]
    images = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    models = {
        "text_encoder": text_encoder.fingerprint(),
        "denoiser": denoiser.fingerprint(),
        "autoencoder": autoencoder.fingerprint(),
    }
    return TextToImageResult(images=images, seeds=seeds, truncated=list(truncated), models=models)
