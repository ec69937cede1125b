"""Few-step sampling for adversarially distilled students (ADD, Sauer et al. 2023; LADD, Sauer et al. 2024).

A student is trained at a handful of discrete flow times (`student_timesteps`: 1, 0.75, 0.5, 0.25 for four
steps) to map x_t straight to a clean sample, x0_hat = x_t - t v (rectified flow, x_t = (1 - t) x0 + t eps).
It samples without classifier-free guidance: the teacher's guided samples were its training data.
`sample_student` shares the samplers' signature (`kinema.sampling.samplers`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from kinema.sampling.samplers import Callback, VelocityFn


def student_timesteps(steps: int) -> list[float]:
    """The `steps` discrete flow times a student trains at, highest noise first: k / steps for k = steps..1.

    LADD (sec. 4) trains a 4-step student at t in {1, 0.75, 0.5, 0.25}; sampling with 1 or 2 steps uses the
    subsets {1} and {1, 0.5}.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return [k / steps for k in range(steps, 0, -1)]


def student_schedule(steps: int, trained_steps: int = 4) -> list[float]:
    """Sampling schedule (steps + 1 times ending at 0) over a student's trained times, for `steps` <= trained.

    `steps` must divide `trained_steps` so that every time visited is one the student was trained at.
    """
    if steps < 1 or trained_steps % steps:
        raise ValueError(f"steps must divide the student's {trained_steps} trained steps, got {steps}")
    return [*student_timesteps(steps), 0.0]


def sample_student(
    velocity_fn: VelocityFn,
    x: Tensor,
    schedule: Sequence[float],
    *,
    callback: Callback | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Multistep student sampling: at each time t predict x0_hat = x - t v(x, t), then go to the next time.

    Without `generator` the next point is the Euler step x + (t_next - t) v, i.e. x0_hat re-noised with the
    noise the student implied, and the result is deterministic (and the same as `sample_euler`). With a CPU
    `generator`, x0_hat is re-noised with fresh noise, x = (1 - t_next) x0_hat + t_next eps, as ADD's and
    consistency models' multistep sampling does (ADD sec. 3.2; Song et al. 2023, alg. 1). A sequence of B
    generators gives row b its own stream, so a row's result does not depend on the rest of the batch.
    """
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != x.shape[0]:
        raise ValueError(f"one generator per row: {len(generator)} generators for a batch of {x.shape[0]}")
    n = len(schedule) - 1
    for i, (t, t_next) in enumerate(itertools.pairwise(schedule)):
        v = velocity_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))  # t as (B,)
        if generator is None or t_next == 0:
            x = x + (t_next - t) * v
        else:
            x0 = x - t * v
            eps = _fresh_noise(x, generator)  # (B, C, h, w)
            x = (1 - t_next) * x0 + t_next * eps
        if callback is not None:
            callback(i, n, x)
    return x


def _fresh_noise(x: Tensor, generator: torch.Generator | Sequence[torch.Generator]) -> Tensor:
    """Standard normal noise shaped like x, drawn on the CPU from one generator or one per row."""
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    rows = [torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype) for g in generator]  # B x (1, C, h, w)
    return torch.cat(rows).to(x.device)
