"""Fixed sinusoidal embeddings (time, 2D position) and the SiLU MLP that lifts conditioning vectors.

The formulas follow diffusers' `get_timestep_embedding` (flip_sin_to_cos=True, shift 0) and
`get_2d_sincos_pos_embed` (SD3 `PatchEmbed`) operation for operation, so that networks built on
them reproduce diffusers checkpoints to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of (already scaled) times t (B,) -> (B, dim) float32 (DDPM / SD3)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half  # (half,)
    args = t.float()[:, None] * torch.exp(exponent)[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


def sincos_table(max_size: int, dim: int, base_size: int) -> Tensor:
    """1D sin-cos table (max_size, dim) for positions i * base_size / max_size, computed in float64 (SD3)."""
    if dim % 2:
        raise ValueError(f"sin-cos position width must be even, got {dim}")
    pos = torch.arange(max_size, dtype=torch.float32) / (max_size / base_size)  # (M,) float32 like diffusers
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = torch.outer(pos.double(), omega)  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()  # (M, dim)


def crop_pos_embed_2d(table: Tensor, h: int, w: int) -> Tensor:
    """Centre crop of the (M x M) 2D sin-cos grid built from a 1D `table` (M, D/2): (h*w, D), row-major.

    Token (r, c) gets [emb(col) | emb(row)] as in diffusers' `PatchEmbed.cropped_pos_embed`.
    """
    m = table.shape[0]
    if h > m or w > m:
        raise ValueError(f"latent of {h}x{w} patches exceeds pos_embed_max_size {m}")
    top, left = (m - h) // 2, (m - w) // 2
    rows = repeat(table[top : top + h], "h d -> h w d", w=w)  # (h, w, D/2)
    cols = repeat(table[left : left + w], "w d -> h w d", h=h)  # (h, w, D/2)
    return torch.cat([cols, rows], dim=-1).flatten(0, 1)  # (h*w, D)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection` with act 'silu')."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
