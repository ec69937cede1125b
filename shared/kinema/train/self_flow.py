"""Self-Flow: self-supervised flow matching with dual-timestep scheduling (Chefer et al. 2026, "Self-Supervised
Flow Matching for Scalable Multi-Modal Synthesis"), a training option of `kinema.train.flow` (`--self-flow`).

Each training sample draws two flow times t and s from the same distribution. A random subset of image tokens
(each with probability `mask_ratio`) is noised to s and the rest to t, and the MMDiT is conditioned token by
token on its own time (`MMDiT.forward` with t of shape (B, N)); t and s are not sorted, so every token's time
still follows the training distribution. The tokens at the noisier level can only be recovered from the cleaner
ones, an information asymmetry that asks the network to model the image, not just denoise patches locally.

On top of the usual velocity loss (the target eps - x0 does not depend on t), a light head on the student's
image tokens after `student_layer` blocks predicts the EMA model's image tokens after `teacher_layer` (deeper)
blocks, where the EMA sees the whole image at the cleaner of the two times with the same noise:

    loss = || v(x_mixed, t_tokens) - (eps - x0) ||^2 + weight * (1 - cos(head(h_student), sg(h_teacher)))

averaged over tokens. The head is training-only; the shipped denoiser is the plain MMDiT and samples as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kinema.nn.mmdit import MMDiT


@dataclass(frozen=True)
class SelfFlowConfig:
    mask_ratio: float = 0.25  # share of tokens at the second time s
    weight: float = 0.8  # of the representation loss
    student_layer: int = 2  # blocks before the student's features (of the tiny preset's 4)
    teacher_layer: int = 3  # blocks before the EMA teacher's features: deeper than the student's

    def check(self, depth: int) -> None:
        if not 0.0 < self.mask_ratio <= 0.5:
            raise ValueError(f"mask_ratio must be in (0, 0.5], got {self.mask_ratio}")
        if self.weight < 0:
            raise ValueError(f"the representation loss weight must be >= 0, got {self.weight}")
        if not 1 <= self.student_layer < self.teacher_layer <= depth:
            raise ValueError(f"need 1 <= student_layer ({self.student_layer}) < teacher_layer "
                             f"({self.teacher_layer}) <= depth ({depth})")  # fmt: skip


class FeatureHead(nn.Module):
    """The student's projection head: a two-layer MLP on each image token (B, N, D) -> (B, N, D)."""

    def __init__(self, width: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * width
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def token_times(t: Tensor, s: Tensor, n_tokens: int, mask_ratio: float, generator: torch.Generator) -> Tensor:
    """Per-token flow times (B, N): s where a Bernoulli(mask_ratio) draw picks the token, else t."""
    picked = torch.rand(t.shape[0], n_tokens, generator=generator) < mask_ratio  # (B, N)
    return torch.where(picked, s[:, None], t[:, None])


def time_map(t_tokens: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """Per-token times (B, N) spread over their patches as a latent-sized map (B, 1, H, W)."""
    hp, wp = grid
    t = t_tokens.view(-1, 1, hp, wp)  # (B, 1, hp, wp), raster order as the MMDiT patchifies
    return t.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)  # (B, 1, H, W)


def self_flow_loss(
    model: MMDiT,
    teacher: MMDiT,
    head: FeatureHead,
    x0: Tensor,
    t: Tensor,
    s: Tensor,
    cond: tuple[Tensor, Tensor, Tensor],
    noise: Tensor,
    t_tokens: Tensor,
    cfg: SelfFlowConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(total loss, its two parts detached) for one batch: latents x0 (B, C, H, W), times t, s (B,),
    cond = (tokens, mask, pooled).

    t_tokens (B, N) are the student's per-token times (`token_times` of t and s), noise the shared eps.
    """
    p = model.params
    grid = (x0.shape[2] // p.patch_size, x0.shape[3] // p.patch_size)
    tt = time_map(t_tokens, grid, p.patch_size)  # (B, 1, H, W)
    x_mixed = (1 - tt) * x0 + tt * noise
    tokens, mask, pooled = cond
    v, (h_student,) = model.forward_features(x_mixed, t_tokens, tokens, pooled, mask, layers=(cfg.student_layer,))
    flow = (v - (noise - x0)).pow(2).mean()

    clean = torch.minimum(t, s).view(-1, 1, 1, 1)  # t = 1 is pure noise here: the cleaner time is the smaller
    with torch.no_grad():
        x_clean = (1 - clean) * x0 + clean * noise
        _, (h_teacher,) = teacher.forward_features(x_clean, clean.flatten(), tokens, pooled, mask,
                                                   layers=(cfg.teacher_layer,))  # fmt: skip
    cosine = F.cosine_similarity(head(h_student), h_teacher, dim=-1).mean()
    rep = 1 - cosine
    return flow + cfg.weight * rep, {"flow_loss": flow.detach(), "rep_loss": rep.detach()}  # no sync per step
