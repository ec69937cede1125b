"""Monocular relative depth: a small conv U-Net predicting inverse depth (disparity), MiDaS-style.

The network (Ronneberger et al. 2015 layout: encoder levels with skip connections into a decoder)
predicts relative inverse depth, defined only up to a positive scale and shift per image, the way
MiDaS (Ranftl et al. 2020, "Towards Robust Monocular Depth Estimation", TPAMI) trains across data
with unknown depth scale. The losses here are that paper's scale-and-shift-invariant loss (sec. 5,
eq. 2-4, least-squares alignment) and its multi-scale gradient matching term (eq. 11); the metrics
align the same way before comparing. Gen-1 (Esser et al. 2023) feeds such maps to the video model
as its structure input.

The network is fully convolutional, but it learns the world at `DepthParams.resolution`; `estimate`
resizes any image so its short side is that resolution (aspect kept), runs, and resizes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class DepthParams:
    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (8, 16, 32, 64, 128)  # one level per entry, each halves the size
    layers_per_block: int = 1
    # 4, not 8: with one channel per group, CPU GroupNorm's results moved ~1e-4 with the torch thread count
    # (measured on a random init), too much for served == in-process within 1e-5; with 2 per group ~1e-6.
    norm_num_groups: int = 4
    resolution: int = 64  # the working resolution: the short side `estimate` resizes images to

    def __post_init__(self) -> None:
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block width must divide into {self.norm_num_groups} groups: {self.block_out_channels}"
            )
        if self.resolution % self.multiple:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {self.multiple}")

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.block_out_channels) - 1)


PRESETS: dict[str, DepthParams] = {
    "mini": DepthParams(),
    "tiny": DepthParams(block_out_channels=(8, 8, 16), norm_num_groups=4, resolution=16),  # tests
}


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual path (as the autoencoder's `ResnetBlock2D`)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DepthNet(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> relative inverse depth (B, 1, H, W); H, W multiples of `multiple`."""

    def __init__(self, params: DepthParams) -> None:
        super().__init__()
        self.params = params
        ch, g, n = params.block_out_channels, params.norm_num_groups, params.layers_per_block
        self.conv_in = nn.Conv2d(params.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = ch[0]
        for i, c in enumerate(ch):
            if i > 0:
                self.downsample.append(nn.Conv2d(prev, c, 3, stride=2, padding=1))
                prev = c
            self.down.append(nn.Sequential(*[ResBlock(prev, c, g) for _ in range(n)]))
        self.up = nn.ModuleList()
        for i in range(len(ch) - 2, -1, -1):  # decoder from the second-deepest level up
            self.up.append(nn.Sequential(ResBlock(ch[i + 1] + ch[i], ch[i], g),
                                         *[ResBlock(ch[i], ch[i], g) for _ in range(n - 1)]))  # fmt: skip
        self.norm_out = nn.GroupNorm(g, ch[0], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[0], 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        m = self.params.multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"image sides must be multiples of {m}, got {tuple(x.shape[-2:])}")
        h = self.conv_in(x)  # (B, C0, H, W)
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                h = self.downsample[i - 1](h)  # (B, Ci, H / 2^i, W / 2^i)
            h = block(h)
            skips.append(h)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))  # (B, Ci, H / 2^i, W / 2^i)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 1, H, W)


def working_size(height: int, width: int, params: DepthParams) -> tuple[int, int]:
    """The size `estimate` runs an image at: short side = resolution, aspect kept, sides multiples of `multiple`."""
    m, short = params.multiple, min(height, width)

    def side(s: int) -> int:
        return max(m, round(s * params.resolution / short / m) * m)

    return side(height), side(width)


def estimate(model: DepthNet, images: Tensor) -> Tensor:
    """Relative inverse depth (B, 1, H, W) of images (B, 3, H, W) in [-1, 1] of any size.

    Antialiased bilinear resize to `working_size`, one forward pass, bilinear resize back.
    """
    h, w = images.shape[-2:]
    size = working_size(h, w, model.params)
    x = images if (h, w) == size else F.interpolate(images, size=size, mode="bilinear", antialias=True)
    d = model(x)  # (B, 1, h', w')
    return d if (h, w) == size else F.interpolate(d, size=(h, w), mode="bilinear", align_corners=False)


def align_scale_shift(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-image least-squares (s, t) minimising sum_i (s * pred_i + t - target_i)^2 over masked pixels.

    MiDaS eq. 4 (closed form of the 2x2 normal equations). pred, target (B, ...) ; returns s, t of shape (B,).
    """
    p, d = rearrange(pred, "b ... -> b (...)"), rearrange(target, "b ... -> b (...)")
    m = torch.ones_like(p) if mask is None else rearrange(mask, "b ... -> b (...)").to(p.dtype)
    n = m.sum(1).clamp_min(1.0)
    mp, md = (m * p).sum(1) / n, (m * d).sum(1) / n
    var = (m * (p - mp[:, None]) ** 2).sum(1) / n
    cov = (m * (p - mp[:, None]) * (d - md[:, None])).sum(1) / n
    s = cov / var.clamp_min(1e-12)
    return s, md - s * mp


def normalise_disparity(target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-image zero median and unit mean absolute deviation (MiDaS eq. 6-7) so every image weighs the same."""
    d = rearrange(target, "b ... -> b (...)")
    m = torch.ones_like(d, dtype=torch.bool) if mask is None else rearrange(mask, "b ... -> b (...)").bool()
    out = torch.empty_like(d)
    for i in range(len(d)):  # masks differ per image: medians cannot batch
        v = d[i][m[i]]
        med = v.median()
        out[i] = (d[i] - med) / (v - med).abs().mean().clamp_min(1e-6)
    return out.reshape(target.shape)


def ssi_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None, kind: str = "mse") -> tuple[Tensor, Tensor]:
    """Scale-and-shift-invariant loss (MiDaS eq. 2 with eq. 4's alignment) and the aligned prediction.

    `kind` "mse" or "l1" over masked pixels after aligning `pred` to `target` per image; a negative
    correlation costs extra (`relu(-corr)`) so the learnt map keeps "larger = nearer".
    """
    if kind not in ("mse", "l1"):
        raise ValueError(f"kind must be 'mse' or 'l1', got {kind!r}")
    s, t = align_scale_shift(pred, target, mask)
    shape = (-1,) + (1,) * (pred.ndim - 1)
    aligned = s.view(shape) * pred + t.view(shape)
    r = aligned - target
    err = r * r if kind == "mse" else r.abs()
    m = torch.ones_like(err) if mask is None else mask.to(err.dtype)
    n = m.flatten(1).sum(1).clamp_min(1.0)

    def std(a: Tensor) -> Tensor:
        a, w = a.flatten(1), m.flatten(1)
        mean = (w * a).sum(1) / n
        return ((w * (a - mean[:, None]) ** 2).sum(1) / n).sqrt().clamp_min(1e-12)

    per_image = (m * err).flatten(1).sum(1) / n
    corr = s * std(pred) / std(target)  # the masked Pearson correlation, from the alignment's scale
    return (per_image + F.relu(-corr)).mean(), aligned


def gradient_matching_loss(aligned: Tensor, target: Tensor, mask: Tensor | None = None, scales: int = 4) -> Tensor:
    """Multi-scale gradient matching (MiDaS eq. 11): |grad (aligned - target)| at `scales` halvings.

    Sharpens discontinuities and keeps planes flat. Tensors (B, 1, H, W).
    """
    r = aligned - target
    m = torch.ones_like(r) if mask is None else mask.to(r.dtype)
    total = r.new_zeros(())
    for k in range(scales):
        if k:
            step = 2**k
            if r.shape[-1] // step < 2 or r.shape[-2] // step < 2:
                break
            rk, mk = r[..., ::step, ::step], m[..., ::step, ::step]
        else:
            rk, mk = r, m
        gx = (rk[..., :, 1:] - rk[..., :, :-1]).abs() * mk[..., :, 1:] * mk[..., :, :-1]  # (B, 1, h, w-1)
        gy = (rk[..., 1:, :] - rk[..., :-1, :]).abs() * mk[..., 1:, :] * mk[..., :-1, :]  # (B, 1, h-1, w)
        total = total + (gx.sum() + gy.sum()) / mk.sum().clamp_min(1.0)
    return total


def load_depth_net(path: str | Path) -> tuple[DepthNet, str]:
    """A `DepthNet` from a Kinema safetensors checkpoint (params in its metadata), in eval mode, and its SHA-256."""
    from safetensors.torch import load_file

    from kinema.nn.checkpoint import params_from_metadata, sha256_file

    path = Path(path)
    model = DepthNet(params_from_metadata(path, DepthParams))
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False), sha256_file(path)
