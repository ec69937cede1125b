"""Temporal guidance for video flows (Gen-1, Esser et al. 2023, sec. 3.4) combined with classifier-free guidance.

A model trained jointly on images and videos predicts a clip two ways: frame-wise (temporal layers off, every
frame an image) and as a video. Gen-1 extrapolates from the frame-wise prediction towards the video prediction
with a temporal guidance weight omega_t, exactly as classifier-free guidance extrapolates from the unconditional
prediction towards the conditional one (Ho & Salimans 2022, eq. 6):

    v = v_frame(c) + omega_t * (v_video(c) - v_frame(c))                       (Gen-1 temporal guidance)

Kinema applies classifier-free guidance to the frame-wise term and the temporal term on top of it:

    v = v_frame(0) + omega * (v_frame(c) - v_frame(0)) + omega_t * (v_video(c) - v_frame(c))

so omega = 1 is Gen-1's formula as written, omega_t = 0 is frame-wise classifier-free guidance (every frame
sampled as an image), omega = omega_t = 1 is the plain conditional video model, and omega_t > 1 pushes the sample
further along the direction that makes it a video, which Gen-1 reports as more temporally consistent. It costs at
most three network evaluations per step (two when omega = 1 or omega_t = 0, one when both are 1).

Everything here is a pure function over a `BranchPredictor` — the caller decides how to batch the branches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from torch import Tensor

from kinema.sampling.edit import start_latents, start_step
from kinema.sampling.guidance import cfg_velocity
from kinema.sampling.samplers import Callback, VelocityFn, sample_euler
from kinema.sampling.schedule import get_schedule


class Branch(NamedTuple):
    """One prediction of a video flow: with or without the content, with or without the temporal layers."""

    conditional: bool
    temporal: bool


UNCOND_FRAME = Branch(conditional=False, temporal=False)
COND_FRAME = Branch(conditional=True, temporal=False)
COND_VIDEO = Branch(conditional=True, temporal=True)

# (x (B, F, C, h, w), t (B,), branches) -> one velocity per branch, in order. One call per step, so an adapter can
# batch branches that share a temporal flag into one network evaluation.
BranchPredictor = Callable[[Tensor, Tensor, Sequence[Branch]], Sequence[Tensor]]
Sampler = Callable[..., Tensor]  # a `kinema.sampling.samplers` function: (velocity_fn, x, schedule, *, callback)


def temporal_guidance_velocity(
    uncond_frame: Tensor | None,
    cond_frame: Tensor,
    cond_video: Tensor | None,
    guidance: float,
    temporal_guidance: float,
) -> Tensor:
    """v = v_frame(0) + omega (v_frame(c) - v_frame(0)) + omega_t (v_video(c) - v_frame(c)) (module docstring).

    Terms whose weight makes them vanish may be None: `uncond_frame` when guidance == 1 and `cond_video` when
    temporal_guidance == 0; then the result is computed without them (bit for bit `cfg_velocity` when omega_t = 0).
    """
    if guidance == 1.0:
        v = cond_frame
    elif uncond_frame is None:
        raise ValueError(f"guidance {guidance} needs the unconditional frame-wise velocity")
    else:
        v = cfg_velocity(cond_frame, uncond_frame, guidance)
    if temporal_guidance == 0.0:
        return v
    if cond_video is None:
        raise ValueError(f"temporal guidance {temporal_guidance} needs the video velocity")
    if guidance == 1.0 and temporal_guidance == 1.0:
        return cond_video
    return v + temporal_guidance * (cond_video - cond_frame)


def needed_branches(guidance: float, temporal_guidance: float) -> tuple[Branch, ...]:
    """The branches a step evaluates for these weights (fewest network evaluations)."""
    if guidance == 1.0 and temporal_guidance == 1.0:
        return (COND_VIDEO,)
    branches = (COND_FRAME,) if guidance == 1.0 else (COND_FRAME, UNCOND_FRAME)
    return branches if temporal_guidance == 0.0 else (*branches, COND_VIDEO)


def temporal_guided(predict: BranchPredictor, guidance: float, temporal_guidance: float) -> VelocityFn:
    """A sampler's `velocity_fn(x, t)` that combines the branches `predict` returns with omega and omega_t."""
    branches = needed_branches(guidance, temporal_guidance)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        got = dict(zip(branches, predict(x, t, branches), strict=True))
        if guidance == 1.0 and temporal_guidance == 1.0:
            return got[COND_VIDEO]
        return temporal_guidance_velocity(
            got.get(UNCOND_FRAME), got[COND_FRAME], got.get(COND_VIDEO), guidance, temporal_guidance
        )

    return velocity


def video_schedule(steps: int, shift: float = 1.0, strength: float = 1.0) -> list[float]:
    """The flow times a run walks: `get_schedule(steps, shift)` from SDEdit's start step for `strength` on.

    strength 1 starts from pure noise; strength s < 1 runs the last ceil(s * steps) steps from the input latents
    noised to that time (Meng et al. 2021, SDEdit sec. 3), which keeps more of the input video.
    """
    return get_schedule(steps, shift)[start_step(steps, strength) :]


def sample_video(
    predict: BranchPredictor,
    noise: Tensor,
    schedule: Sequence[float],
    *,
    guidance: float,
    temporal_guidance: float,
    sampler: Sampler = sample_euler,
    init_latents: Tensor | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Sample clips (B, F, C, h, w) with classifier-free and temporal guidance from `noise` of that shape.

    With `init_latents` the run starts from them noised with `noise` to `schedule[0]` (SDEdit; see
    `video_schedule`), otherwise from `noise`; a schedule that does not start at 1 needs init latents. A clip
    longer than the network's window samples through a `kinema.sampling.windows.windowed_predictor`.
    """
    if noise.dim() != 5:
        raise ValueError(f"noise must be (B, F, C, h, w), got shape {tuple(noise.shape)}")
    if schedule[0] != 1.0 and init_latents is None:
        raise ValueError("a schedule that starts below t = 1 needs init_latents to start from")
    if init_latents is not None and init_latents.shape != noise.shape:
        raise ValueError(f"init_latents {tuple(init_latents.shape)} and noise {tuple(noise.shape)} differ in shape")
    x = start_latents(noise, schedule[0], init_latents)
    return sampler(temporal_guided(predict, guidance, temporal_guidance), x, schedule, callback=callback)
