"""Patch discriminator and hinge losses for sharper autoencoder reconstructions.

Following taming-transformers / LDM (Esser et al. 2021, "Taming Transformers", sec. 3.1; Rombach
et al. 2022, appendix G): an N-layer PatchGAN (Isola et al. 2017) judges overlapping patches,
and the decoder adds `weight * -D(rec)` to its reconstruction loss. Training only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """Conv stack with stride-2 stages and GroupNorm; outputs one logit per receptive-field patch."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < layers - 1 else 1
            blocks += [nn.Conv2d(width, nxt, 4, stride, 1), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            width = nxt
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, h, w) patch logits


def discriminator_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge loss for the discriminator (Lim & Ye 2017): mean relu(1 - D(x)) + relu(1 + D(G(z)))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating hinge generator loss: -mean D(G(z))."""
    return -fake_logits.mean()
