"""LADD's latent discriminator: a frozen teacher MMDiT as feature network plus light trainable heads.

Latent Adversarial Diffusion Distillation (Sauer et al. 2024, sec. 3 and fig. 2) replaces ADD's pixel-space
DINOv2 discriminator by the teacher itself: a (re-noised) latent goes through the frozen teacher at noise
level t_hat, the image-token features of several of its blocks are taken, and one small head per block turns
them into per-token real/fake logits, conditioned on t_hat and the pooled text (StyleGAN-T style heads,
Sauer et al. 2023). Only the heads train; gradients still flow through the frozen teacher into its input,
which is how the student learns.

`TeacherFeatures` reads the blocks with forward hooks, so `kinema.nn.mmdit` stays untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from kinema.nn.embeddings import MLPEmbedder, timestep_embedding
from kinema.nn.mmdit import TIME_FREQ_DIM, MMDiT, MMDiTParams


@dataclass(frozen=True)
class DiscriminatorParams:
    feature_blocks: tuple[int, ...] = (0, 1, 2, 3)  # teacher blocks whose image tokens feed a head each
    feature_dim: int = 192  # the teacher's hidden_size
    pooled_dim: int = 384  # width of the pooled text vector
    head_width: int = 128
    kernel_size: int = 3  # spatial conv over the teacher's patch grid
    timestep_scale: float = 1000.0  # as the teacher embeds t

    def __post_init__(self) -> None:
        if not self.feature_blocks:
            raise ValueError("feature_blocks must name at least one teacher block")
        if len(set(self.feature_blocks)) != len(self.feature_blocks) or min(self.feature_blocks) < 0:
            raise ValueError(f"feature_blocks must be distinct non-negative indices, got {self.feature_blocks}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.head_width < 8 or self.head_width % 8:
            raise ValueError(f"head_width must be a positive multiple of 8 (GroupNorm), got {self.head_width}")

    @classmethod
    def for_teacher(cls, teacher: MMDiTParams, **kwargs) -> DiscriminatorParams:
        """Params whose widths match `teacher`; by default one head on every block."""
        kwargs.setdefault("feature_blocks", tuple(range(teacher.depth)))
        return cls(feature_dim=teacher.hidden_size, pooled_dim=teacher.pooled_dim, **kwargs)


class TeacherFeatures(nn.Module):
    """A frozen MMDiT run as a feature extractor: image-token outputs (B, N, D) of the chosen blocks.

    The teacher is put in eval mode with requires_grad off; its parameters never get gradients, while
    gradients with respect to its input still flow (the student's adversarial signal).
    """

    def __init__(self, teacher: MMDiT, blocks: tuple[int, ...]) -> None:
        super().__init__()
        if bad := [i for i in blocks if not 0 <= i < len(teacher.blocks)]:
            raise ValueError(f"feature blocks {bad} are outside the teacher's 0..{len(teacher.blocks) - 1}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.blocks = tuple(blocks)
        self._captured: dict[int, Tensor] | None = None
        for i in set(blocks):
            teacher.blocks[i].register_forward_hook(self._hook(i))

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor | None]) -> None:
            if self._captured is not None:  # only while this wrapper runs the teacher
                self._captured[index] = output[0]  # (B, N, D) image tokens after the block

        return hook

    def train(self, mode: bool = True) -> TeacherFeatures:
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode
        return self

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, context_mask: Tensor | None
    ) -> list[Tensor]:
        """Features of latents x (B, C, H, W) at flow times t (B,): one (B, N, D) tensor per chosen block."""
        self._captured = {}
        try:
            self.teacher(x, t, context, pooled, context_mask)
            captured = self._captured
        finally:
            self._captured = None
        return [captured[i] for i in self.blocks]


class DiscriminatorHead(nn.Module):
    """Per-token logits from one block's tokens: LayerNorm, spatial conv, adaLN on the condition, projection.

    The output is a plain linear logit plus a projection-discriminator term <h, embed(c)> / sqrt(width)
    (Miyato & Koyama 2018), the conditioning StyleGAN-T's and ADD's heads use.
    """

    def __init__(self, p: DiscriminatorParams) -> None:
        super().__init__()
        w = p.head_width
        self.norm = nn.LayerNorm(p.feature_dim)
        self.conv = nn.Conv2d(p.feature_dim, w, p.kernel_size, padding=p.kernel_size // 2)
        self.group_norm = nn.GroupNorm(8, w)
        self.modulation = nn.Linear(w, 2 * w)  # (scale, shift) from the condition
        self.mix = nn.Conv2d(w, w, 1)
        self.out = nn.Conv2d(w, 1, 1)
        self.project = nn.Linear(w, w)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, tokens: Tensor, cond: Tensor, h: int, w: int) -> Tensor:
        """tokens (B, N, D) on an h x w grid, cond (B, W) -> logits (B, N)."""
        x = rearrange(self.norm(tokens), "b (h w) d -> b d h w", h=h, w=w)  # (B, D, h, w)
        x = self.group_norm(self.conv(x))  # (B, W, h, w)
        scale, shift = rearrange(self.modulation(cond), "b (two c) -> two b c 1 1", two=2)  # (B, W, 1, 1) each
        x = F.leaky_relu(x * (1 + scale) + shift, 0.2)  # (B, W, h, w)
        x = F.leaky_relu(self.mix(x), 0.2)  # (B, W, h, w)
        proj = torch.einsum("bchw,bc->bhw", x, self.project(cond)) / math.sqrt(x.shape[1])  # (B, h, w)
        logits = self.out(x)[:, 0] + proj  # (B, h, w)
        return rearrange(logits, "b h w -> b (h w)")  # (B, N)


class DiscriminatorHeads(nn.Module):
    """The trainable part: a condition embedding of (t_hat, pooled text) shared by one head per feature block."""

    def __init__(self, params: DiscriminatorParams) -> None:
        super().__init__()
        self.params = p = params
        self.t_embedder = MLPEmbedder(TIME_FREQ_DIM, p.head_width)
        self.y_embedder = MLPEmbedder(p.pooled_dim, p.head_width)
        self.heads = nn.ModuleList(DiscriminatorHead(p) for _ in p.feature_blocks)

    def forward(self, features: list[Tensor], t: Tensor, pooled: Tensor, h: int, w: int) -> Tensor:
        """Features (one (B, N, D) per block) at noise levels t (B,) -> logits (B, heads * N)."""
        if len(features) != len(self.heads):
            raise ValueError(f"got {len(features)} feature maps for {len(self.heads)} heads")
        t_freq = timestep_embedding(t * self.params.timestep_scale, TIME_FREQ_DIM).to(pooled.dtype)  # (B, 256)
        cond = F.silu(self.t_embedder(t_freq) + self.y_embedder(pooled))  # (B, W)
        return torch.cat([head(f, cond, h, w) for head, f in zip(self.heads, features, strict=True)], dim=1)


class LatentDiscriminator(nn.Module):
    """LADD's discriminator D(x_t_hat, t_hat, text): frozen teacher features -> trainable heads -> per-token logits.

    `heads` holds everything that trains (and all a checkpoint needs beside the teacher's own weights).
    """

    def __init__(self, teacher: MMDiT, params: DiscriminatorParams) -> None:
        super().__init__()
        if params.feature_dim != teacher.params.hidden_size or params.pooled_dim != teacher.params.pooled_dim:
            raise ValueError(
                f"discriminator widths {params.feature_dim}/{params.pooled_dim} do not match the teacher's "
                f"{teacher.params.hidden_size}/{teacher.params.pooled_dim}"
            )
        self.features = TeacherFeatures(teacher, params.feature_blocks)
        self.heads = DiscriminatorHeads(params)
        self.patch_size = teacher.params.patch_size

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, context_mask: Tensor | None = None
    ) -> Tensor:
        """Logits (B, heads * N) for noised latents x (B, C, H, W) at flow times t (B,)."""
        h, w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        feats = self.features(x, t, context, pooled, context_mask)  # per block (B, N, D)
        return self.heads(feats, t, pooled, h, w)  # (B, heads * N)
