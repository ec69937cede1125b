"""Editing an image with a rectified flow: start part-way along the path (SDEdit) and keep a known region
(latent inpainting).

SDEdit (Meng et al. 2021, sec. 3) perturbs the image to an intermediate time and integrates the reverse ODE from
there; on the rectified-flow path x_t = (1 - t) x_0 + t eps (SD3, Esser et al. 2024, eq. 3) the perturbation is
`noised(x0, eps, t)`. Latent inpainting (Rombach et al. 2022, LDM sec. 4.3.2 / appendix; the blend of Lugmayr et
al. 2022, RePaint eq. 8-9, without resampling) replaces the known region after every step by the known latents
noised to the step's time with the same eps, so at t = 0 it holds the known latents exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor

from kinema.sampling.samplers import Callback, VelocityFn

Sampler = Callable[..., Tensor]  # a `kinema.sampling.samplers` function: (velocity_fn, x, schedule, *, callback)


def start_step(steps: int, strength: float) -> int:
    """The index in a `steps` schedule SDEdit starts at: it runs the last ceil(strength * steps) steps.

    strength is in (0, 1]; 1 runs every step from pure noise. The product is rounded to 4 decimals before the
    ceiling so that a strength that travelled as float32 (0.6 -> 0.60000002) runs as many steps as its float64.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    run = max(1, math.ceil(round(strength * steps, 4)))
    return steps - run


def noised(x0: Tensor, noise: Tensor, t: float) -> Tensor:
    """x_t = (1 - t) x0 + t eps (SD3 eq. 3): the point at flow time t on the straight path from x0 to eps.

    t = 1 gives eps exactly, so an edit at strength 1 starts from the very noise text-to-image starts from.
    """
    return (1.0 - t) * x0 + t * noise


def start_latents(noise: Tensor, t: float, init_latents: Tensor | None) -> Tensor:
    """Where a run whose schedule starts at time t starts: `noise`, or the init latents noised to t (SDEdit)."""
    return noise if init_latents is None else noised(init_latents, noise, t)


def blend(x: Tensor, known: Tensor, noise: Tensor, mask: Tensor, t: float) -> Tensor:
    """mask * x + (1 - mask) * x_t(known): x in the mask (1 = generate), the known latents at time t elsewhere."""
    return mask * x + (1.0 - mask) * noised(known, noise, t)


def sample_masked(
    sampler: Sampler,
    velocity_fn: VelocityFn,
    x: Tensor,
    schedule: Sequence[float],
    *,
    known: Tensor,
    noise: Tensor,
    mask: Tensor,
    callback: Callback | None = None,
) -> Tensor:
    """`sampler` one step at a time, each step followed by `blend` at the step's end time (latent inpainting).

    Each step is the sampler's own step over a two-point schedule, so the arithmetic inside the mask is exactly
    the unmasked loop's; the last step ends at t = 0 and leaves `known` outside the mask. `mask` broadcasts
    against x, (B or 1, 1, h, w) with values in [0, 1].
    """
    n = len(schedule) - 1
    for i in range(n):
        t_next = schedule[i + 1]
        x = blend(sampler(velocity_fn, x, schedule[i : i + 2]), known, noise, mask, t_next)
        if callback is not None:
            callback(i, n, x)
    return x
