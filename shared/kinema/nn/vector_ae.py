"""An autoencoder with one vector per image: the representation the interpretation networks (IIN) work on.

The LDM autoencoder (`kinema.nn.autoencoder`) keeps a 4x16x16 latent map, in which an object's shape sits in a few
positions that move with the object: a linear read of shape from it is near chance (docs/interpret.md). The IIN paper
(Esser, Rombach & Ommer 2020) interprets the bottleneck of an autoencoder with a vector code; this is that network:
strided convolutions down to 4x4, one linear layer to a `dim`-vector, and the mirror image back to pixels, plus
one channel more: the objects' silhouette (a logit per pixel), which the trainer asks for so that the code keeps the
outline that tells a cube from a cone, a few pixels of a 64x64 image.

    model = VectorAutoencoder(VectorAutoencoderParams())
    code = model.encode(images)   # (B, 3, 64, 64) in [-1, 1] -> (B, dim)
    images = model.decode(code)   # (B, dim) -> (B, 3, 64, 64), unclamped
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class VectorAutoencoderParams:
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 128)  # after each of the four stride-2 steps
    dim: int = 64  # the code
    groups: int = 8  # GroupNorm groups
    mask_channel: bool = True  # the decoder also predicts the silhouette (training only; `decode` drops it)

    def __post_init__(self) -> None:
        down = 2 ** len(self.channels)
        if self.image_size % down or self.image_size < down:
            raise ValueError(f"image_size must be a multiple of {down}, got {self.image_size}")
        if self.dim < 1 or any(c % self.groups for c in self.channels):
            raise ValueError(f"dim must be >= 1 and every channel count a multiple of {self.groups}")

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** len(self.channels)


def _norm_act(params: VectorAutoencoderParams, channels: int) -> list[nn.Module]:
    return [nn.GroupNorm(params.groups, channels), nn.SiLU()]


def _refine(params: VectorAutoencoderParams, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), *_norm_act(params, channels))


class VectorAutoencoder(nn.Module):
    """Image <-> `dim`-vector; see the module docstring."""

    def __init__(self, params: VectorAutoencoderParams) -> None:
        super().__init__()
        self.params = params
        ch = params.channels
        enc: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(ch):
            enc += [nn.Conv2d(cin, c, 4, stride=2, padding=1), *_norm_act(params, c)]
            if 0 < i < len(ch) - 1:  # a 3x3 refinement at the middle resolutions
                enc.append(_refine(params, c))
            cin = c
        self.encoder = nn.Sequential(*enc)
        flat = ch[-1] * params.grid**2
        self.to_code = nn.Linear(flat, params.dim)
        self.from_code = nn.Linear(params.dim, flat)
        dec: list[nn.Module] = [nn.SiLU(), _refine(params, ch[-1])]
        for i in range(len(ch) - 1, 0, -1):
            dec += [nn.ConvTranspose2d(ch[i], ch[i - 1], 4, stride=2, padding=1), *_norm_act(params, ch[i - 1])]
            if i > 1:
                dec.append(_refine(params, ch[i - 1]))
        dec.append(nn.ConvTranspose2d(ch[0], 3 + int(params.mask_channel), 4, stride=2, padding=1))
        self.decoder = nn.Sequential(*dec)

    def check_images(self, images: Tensor) -> None:
        s = self.params.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be (B, 3, {s}, {s}), got {tuple(images.shape)}")

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, dim)."""
        self.check_images(images)
        return self.to_code(self.encoder(images).flatten(1))

    def decode(self, code: Tensor) -> Tensor:
        """(B, dim) -> (B, 3, S, S), not clamped."""
        return self.decode_all(code)[:, :3]

    def decode_all(self, code: Tensor) -> Tensor:
        """(B, dim) -> (B, 3 [+ 1 silhouette logit], S, S)."""
        if code.ndim != 2 or code.shape[1] != self.params.dim:
            raise ValueError(f"codes must be (B, {self.params.dim}), got {tuple(code.shape)}")
        g = self.params.grid
        return self.decoder(self.from_code(code).view(len(code), self.params.channels[-1], g, g))

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["VectorAutoencoder", "VectorAutoencoderParams", "count_parameters"]


if __name__ == "__main__":  # a shape check
    m = VectorAutoencoder(VectorAutoencoderParams())
    print(count_parameters(m), m(torch.zeros(2, 3, 64, 64)).shape)
