"""Guidance on flow velocities."""

from __future__ import annotations

from torch import Tensor


def cfg_velocity(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) on velocities: uncond + scale * (cond - uncond).

    SD3 samples with it unchanged on v (sec. 5.3, CFG scale 5-7); scale 1 returns `cond`.
    """
    return uncond + scale * (cond - uncond)
