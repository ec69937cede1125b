"""Flow-time schedules for rectified flow, x_t = (1 - t) x0 + t eps (SD3, Esser et al. 2024, eq. 3 and sec. 5.3.2).

t = 1 is pure noise and t = 0 is data. Sampling walks a schedule from 1 down to 0; training draws t
from the logit-normal density (SD3 sec. 3.1, eq. 19).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def shift_sigmas(t: Tensor | float, shift: float) -> Tensor | float:
    """Resolution-dependent timestep shift t' = shift * t / (1 + (shift - 1) * t) (SD3 eq. 23, alpha = shift).

    Keeps 0 and 1 fixed and is monotone; shift > 1 spends more of the schedule near pure noise, which
    larger images need because they keep more signal at the same t (SD3 sec. 5.3.2).
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0) -> float:
    """SD3's shift for an image of `num_tokens` tokens: base_shift * sqrt(num_tokens / base_tokens).

    SD3 sec. 5.3.2 matches the signal-to-noise ratio at a resolution with m values to that at a base
    resolution with n values by alpha = sqrt(m / n) (eq. 22-23). The default base is SD3's 256^2
    pre-training resolution in patch tokens (f=8 latent, 2x2 patches: 16 x 16 = 256 tokens). Then
    1024^2 (4096 tokens) gives 4.0; SD3 reports 3.0 as the best shift there after a human preference
    study (sec. 5.3.2), so pass an explicit shift where a model's card names one.
    """
    if num_tokens < 1 or base_tokens < 1:
        raise ValueError(f"token counts must be positive, got {num_tokens} and {base_tokens}")
    return base_shift * math.sqrt(num_tokens / base_tokens)


def get_schedule(steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 flow times from 1.0 to 0.0, uniform in t before the SD3 shift (eq. 23)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return [float(shift_sigmas(1.0 - i / steps, shift)) for i in range(steps + 1)]


def logit_normal_t(n: int, m: float = 0.0, s: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """n training times t = sigmoid(u), u ~ N(m, s^2): the logit-normal density of SD3 sec. 3.1, eq. 19."""
    if s <= 0:
        raise ValueError(f"logit-normal scale s must be positive, got {s}")
    return torch.sigmoid(m + s * torch.randn(n, generator=generator))
