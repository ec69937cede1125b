"""ODE samplers for rectified flow, dx/dt = v(x, t), integrated from t = 1 (noise) to t = 0 (data).

Every sampler shares one signature, k-diffusion style: `sampler(velocity_fn, x, schedule, *, callback)`
where `velocity_fn(x, t) -> v` takes t of shape (B,) and `schedule` is a decreasing list of flow times
(see `kinema.sampling.schedule.get_schedule`). SD3 samples its flows with Euler steps (sec. 5.1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor | None], None]  # (step i, steps n, x after step i or None)


def initial_noise(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal x_1 drawn on the CPU from its own generator: the same seed gives the same bits."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype)


def _times(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)


def sample_euler(
    velocity_fn: VelocityFn, x: Tensor, schedule: Sequence[float], *, callback: Callback | None = None
) -> Tensor:
    """Euler's method x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i) (SD3 eq. 1 discretised)."""
    n = len(schedule) - 1
    for i, (t, t_next) in enumerate(itertools.pairwise(schedule)):
        x = x + (t_next - t) * velocity_fn(x, _times(t, x))
        if callback is not None:
            callback(i, n, x)
    return x


def sample_heun(
    velocity_fn: VelocityFn, x: Tensor, schedule: Sequence[float], *, callback: Callback | None = None
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, alg. 1): Euler predictor, trapezoidal corrector.

    The step that ends at t = 0 is a plain Euler step, as in Karras et al., so it costs one evaluation.
    """
    n = len(schedule) - 1
    for i, (t, t_next) in enumerate(itertools.pairwise(schedule)):
        dt = t_next - t
        v = velocity_fn(x, _times(t, x))
        x_pred = x + dt * v
        x = x_pred if t_next == 0 else x + dt * 0.5 * (v + velocity_fn(x_pred, _times(t_next, x)))
        if callback is not None:
            callback(i, n, x)
    return x
