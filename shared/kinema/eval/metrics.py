"""Image metrics (PSNR, SSIM) for batches and the fixed-grid flow-matching validation loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from skimage.metrics import structural_similarity

VelocityFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]  # (x_t, t (N,), cond) -> v
DEFAULT_T_GRID: tuple[float, ...] = tuple(float(t) for t in np.linspace(0.1, 0.9, 8))


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim != 4:
        raise ValueError(f"expected a batch (N, H, W, C), got shape {a.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB, 10 log10(R^2 / MSE), of batches (N, H, W, C); inf where identical."""
    a, b = _pair(a, b)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)  # (N,)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004, eq. 13) of batches (N, H, W, C), mean over channels.

    The paper's settings: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03 and
    population (not sample) covariances; each channel is scored separately and averaged.
    """
    a, b = _pair(a, b)
    return np.array(
        [
            structural_similarity(
                x,
                y,
                data_range=data_range,
                channel_axis=-1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for x, y in zip(a, b, strict=True)
        ]
    )


@torch.no_grad()
def flow_matching_val_loss(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    cond: object = None,
    t_grid: Sequence[float] = DEFAULT_T_GRID,
    seed: int = 0,
) -> dict[str, float]:
    """Validation loss of a rectified-flow model at a fixed grid of t with fixed noise (SD3 protocol).

    Esser et al. 2024 (SD3, scaling study) track the flow-matching loss at fixed timesteps so that
    runs are comparable: x_t = (1 - t) x0 + t eps, target velocity eps - x0, loss the mean
    squared error of `velocity_fn(x_t, t, cond)`. The noise for each t comes from a generator
    seeded with `seed`, so two calls with the same data give the same numbers.
    Returns {"loss": mean over t, "loss@0.100": ..., one key per t}.
    """
    if not t_grid or not all(0.0 <= t <= 1.0 for t in t_grid):
        raise ValueError(f"t_grid must be a non-empty sequence in [0, 1], got {t_grid}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (len(x0),) + (1,) * (x0.ndim - 1)
    out: dict[str, float] = {}
    for t in t_grid:
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, x0.dtype)
        tt = torch.full((len(x0),), float(t), device=x0.device, dtype=x0.dtype)  # (N,)
        x_t = (1 - tt.view(shape)) * x0 + tt.view(shape) * eps
        v = velocity_fn(x_t, tt, cond)
        if v.shape != x0.shape:
            raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(x0.shape)}")
        out[f"loss@{t:.3f}"] = float(((v.float() - (eps - x0).float()) ** 2).mean())
    out["loss"] = float(np.mean(list(out.values())))
    return out
