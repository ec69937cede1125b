"""Video MMDiT: the image MMDiT with temporal layers, depth structure and a structure-fidelity level (Gen-1).

Gen-1 (Esser et al. 2023, "Structure and Content-Guided Video Synthesis with Diffusion Models", sec. 3.2-3.3)
turns an image latent diffusion model into a video model by adding temporal layers that are active only for
video inputs, so one set of weights is both the image model (temporal layers off, or 1-frame inputs) and the
video model; structure (monocular depth, blurred to a level t_s) is concatenated to the noisy latent, and content
enters where text does. Here the image model is Kinema's MMDiT (`kinema.nn.mmdit`, SD3):

- temporal layers: after every `temporal_every`-th joint block, attention across the F frames at each spatial
  token (factorised: spatial and text attention stay inside the joint block, per frame), with a fixed sinusoidal
  frame-index embedding on the attention input and an adaLN-zero gate, so a new layer adds exactly zero;
- structure: depth channels (B, F, S, h, w) at the latent's size, patchified like the latent and embedded by a
  zero-initialised linear layer that is added to the latent's patch embedding. A linear map of the concatenated
  channels [latent | structure] is the sum of one linear map per part, so this *is* Gen-1's concatenation, written
  so that the image model's `x_embedder` keeps its shape and its checkpoints load unchanged;
- structure level t_s in [0, 1]: embedded like the timestep (sinusoidal + MLP, last layer zero-initialised) and
  added to the conditioning vector; `degrade_structure` is the blur it names;
- content: text (MiniLM tokens + pooled) as in the image model, or a reference frame's autoencoder latent mapped
  by `ReferenceContent` into the same (tokens, mask, pooled) slots (see its docstring for why).

With every new part at its initialisation, the network computes exactly what the image MMDiT computes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from kinema.nn.embeddings import MLPEmbedder, timestep_embedding
from kinema.nn.mmdit import TIME_FREQ_DIM, MMDiT, MMDiTParams, _layer_norm, _modulation, _norm_weight


@dataclass(frozen=True)
class VideoMMDiTParams(MMDiTParams):
    """MMDiTParams plus the video parts; the inherited fields describe the image model it extends."""

    structure_channels: int = 1  # depth: one channel
    temporal_every: int = 1  # a temporal layer after every k-th joint block (and always after the last)
    max_frames: int = 64  # frames the sinusoidal frame index is spread over; longer inputs are rejected
    reference_grid: int = 2  # a reference frame becomes reference_grid**2 content tokens
    reference_hidden: int = 256  # width of the MLP that lifts a reference latent into the text spaces

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.structure_channels < 0:
            raise ValueError(f"structure_channels must be >= 0, got {self.structure_channels}")
        if not 1 <= self.temporal_every <= self.depth:
            raise ValueError(f"temporal_every must be in 1..depth={self.depth}, got {self.temporal_every}")
        if self.max_frames < 1 or self.reference_grid < 1 or self.reference_hidden < 1:
            raise ValueError("max_frames, reference_grid and reference_hidden must be positive")

    @classmethod
    def from_image(cls, image: MMDiTParams, **video: object) -> VideoMMDiTParams:
        """The video params that extend `image` (an MMDiTParams), with video fields from `video`."""
        base = {f.name: getattr(image, f.name) for f in dataclasses.fields(MMDiTParams)}
        return cls(**base, **video)

    def image_params(self) -> MMDiTParams:
        return MMDiTParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MMDiTParams)})

    @property
    def temporal_after(self) -> tuple[int, ...]:
        """Indices of the joint blocks a temporal layer follows."""
        k = self.temporal_every
        return tuple(i for i in range(self.depth) if (i + 1) % k == 0 or i == self.depth - 1)


PRESETS: dict[str, VideoMMDiTParams] = {
    # The shipped denoiser ('tiny' MMDiT on the 4-channel latents) with a temporal layer after every block.
    "tiny": VideoMMDiTParams(depth=4, hidden_size=192, num_heads=3),
    # Half the temporal layers: cheaper on a CPU.
    "tiny-t2": VideoMMDiTParams(depth=4, hidden_size=192, num_heads=3, temporal_every=2),
    "mini": VideoMMDiTParams(),
}


def frame_embedding(frames: int, dim: int, max_frames: int) -> Tensor:
    """Fixed sinusoidal embedding of frame indices 0..frames-1: (frames, dim).

    Indices are spread over [0, 1000) as the timestep is (index * 1000 / max_frames), so neighbouring frames get
    clearly different low-frequency components whatever the clip length.
    """
    if frames > max_frames:
        raise ValueError(f"{frames} frames exceed max_frames {max_frames}")
    index = torch.arange(frames, dtype=torch.float32) * (1000.0 / max_frames)
    return timestep_embedding(index, dim)  # (F, D)


class TemporalAttention(nn.Module):
    """Self-attention across frames at each spatial token, adaLN-zero gated (zero output at initialisation)."""

    def __init__(self, p: VideoMMDiTParams) -> None:
        super().__init__()
        d = p.hidden_size
        self.heads, self.max_frames = p.num_heads, p.max_frames
        self.mod = nn.Linear(d, 3 * d)  # (shift, scale, gate) from the conditioning vector; zero-initialised
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor, vec: Tensor, frames: int) -> Tensor:
        """x (B*F, N, D) tokens of F frames per clip, vec (B*F, D) = SiLU(conditioning) -> (B*F, N, D)."""
        shift, scale, gate = _modulation(self.mod, vec)  # (B*F, 1, D) each
        h = torch.addcmul(shift, _layer_norm(x, _norm_weight(x)), 1 + scale)  # (B*F, N, D)
        h = rearrange(h, "(b f) n d -> (b n) f d", f=frames)  # (B*N, F, D): one sequence per spatial token
        h = h + frame_embedding(frames, h.shape[-1], self.max_frames).to(h)  # (B*N, F, D)
        q, k, v = rearrange(self.qkv(h), "s f (three h d) -> three s h f d", three=3, h=self.heads)  # (B*N, H, F, d)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "s h f d -> s f (h d)")  # (B*N, F, D)
        out = rearrange(self.proj(out), "(b n) f d -> (b f) n d", n=x.shape[1])  # (B*F, N, D)
        return torch.addcmul(x, gate, out)  # (B*F, N, D)


class ReferenceContent(nn.Module):
    """Content from a reference frame: its autoencoder latent -> (tokens, mask, pooled) in the text slots.

    Gen-1 takes content from a CLIP image embedding of a frame; no CLIP ships here (RECIPES.md), so the content
    of a reference frame is read from the shipped autoencoder's latent instead, pooled hard enough to carry
    colours and their rough layout but not the geometry (the structure input owns geometry):
    an average pool to a `reference_grid` x `reference_grid` grid gives the tokens (plus a learned position
    each), and the latent's global per-channel mean and standard deviation give the pooled vector. An MLP lifts
    both into MiniLM's token and pooled spaces, so the network sees content exactly where it sees text and a
    keyframe edited with the image model can steer a whole clip (keyframe propagation).
    """

    def __init__(self, p: VideoMMDiTParams) -> None:
        super().__init__()
        c, g, hid = p.in_channels, p.reference_grid, p.reference_hidden
        self.grid = g
        self.tokens = nn.Sequential(nn.Linear(c, hid), nn.SiLU(), nn.Linear(hid, p.context_dim))
        self.positions = nn.Parameter(torch.zeros(g * g, p.context_dim))
        self.pooled = nn.Sequential(nn.Linear(2 * c, hid), nn.SiLU(), nn.Linear(hid, p.pooled_dim))

    def forward(self, latent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """latent (B, C, h, w) -> tokens (B, g*g, Dc), mask (B, g*g) all True, pooled (B, Dp)."""
        cells = rearrange(F.adaptive_avg_pool2d(latent, self.grid), "b c h w -> b (h w) c")  # (B, g*g, C)
        tokens = self.tokens(cells) + self.positions  # (B, g*g, Dc)
        stats = torch.cat([latent.mean(dim=(2, 3)), latent.std(dim=(2, 3))], dim=1)  # (B, 2C)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=latent.device)  # (B, g*g)
        return tokens, mask, self.pooled(stats)


# Names of the modules the video model adds to the image MMDiT.
VIDEO_MODULES = ("structure_embedder.", "ts_embedder.", "temporal_blocks.", "reference.")


class VideoMMDiT(MMDiT):
    """Velocity network over clips: (x_t (B, F, C, h, w), t, content, structure, t_s) -> v (B, F, C, h, w).

    The image MMDiT's modules keep their names, so its checkpoints load with `load_image_weights`; the forward
    pass repeats `MMDiT.forward` with the video parts threaded in (deliberately duplicated: `kinema.nn.mmdit`
    stays the image model, untouched).
    """

    def __init__(self, params: VideoMMDiTParams) -> None:
        super().__init__(params)
        p = params
        d = p.hidden_size
        self.structure_embedder = nn.Linear(p.structure_channels * p.patch_size**2, d) if p.structure_channels else None
        self.ts_embedder = MLPEmbedder(TIME_FREQ_DIM, d)
        self.temporal_blocks = nn.ModuleList(TemporalAttention(p) for _ in p.temporal_after)
        self._temporal_of = {block: i for i, block in enumerate(p.temporal_after)}
        self.reference = ReferenceContent(p)
        self._init_video_weights()

    def _init_video_weights(self) -> None:
        for layer in self.temporal_blocks:
            nn.init.xavier_uniform_(layer.qkv.weight)
            nn.init.xavier_uniform_(layer.proj.weight)
            for m in (layer.qkv, layer.proj):
                nn.init.zeros_(m.bias)
            nn.init.zeros_(layer.mod.weight)  # adaLN-zero: gate 0, the layer adds nothing
            nn.init.zeros_(layer.mod.bias)
        nn.init.normal_(self.ts_embedder.linear_1.weight, std=0.02)
        nn.init.zeros_(self.ts_embedder.linear_1.bias)
        nn.init.zeros_(self.ts_embedder.linear_2.weight)  # t_s adds nothing to the conditioning at first
        nn.init.zeros_(self.ts_embedder.linear_2.bias)
        if self.structure_embedder is not None:  # zero: the structure channels add nothing at first
            nn.init.zeros_(self.structure_embedder.weight)
            nn.init.zeros_(self.structure_embedder.bias)

    def new_parameters(self) -> list[nn.Parameter]:
        """The parameters the image model does not have (temporal, structure, t_s, reference)."""
        return [p for name, p in self.named_parameters() if name.startswith(VIDEO_MODULES)]

    def load_image_weights(self, state: dict[str, Tensor]) -> None:
        """Load an image MMDiT's state dict; the video parts keep their (identity) initialisation."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing_image = [k for k in missing if not k.startswith(VIDEO_MODULES)]
        if unexpected or missing_image:
            raise ValueError(f"not an image MMDiT of these params: missing {missing_image[:5]}, "
                             f"unexpected {unexpected[:5]}")  # fmt: skip

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor,
        context_mask: Tensor | None = None,
        *,
        structure: Tensor | None = None,
        structure_level: Tensor | None = None,
        temporal: bool = True,
    ) -> Tensor:
        """Velocity for latent clips x (B, F, C, h, w) at flow times t (B,).

        context (B, L, Dc), pooled (B, Dp), context_mask (B, L): content, shared by a clip's frames.
        structure (B, F, S, h, w): per-frame structure at the latent's size (`structure_input`), or None for none.
        structure_level (B,): t_s in [0, 1] the structure was degraded to, or None (the image model's vector).
        temporal: False runs every frame on its own (Gen-1's frame-wise prediction); 1-frame inputs always do.
        """
        p = self.params
        b, f, _, h, w = x.shape
        if h % p.patch_size or w % p.patch_size:
            raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size {p.patch_size}")
        if f > p.max_frames:
            raise ValueError(f"{f} frames exceed max_frames {p.max_frames}")
        hp, wp = h // p.patch_size, w // p.patch_size
        patchify = "b f c (h p) (w q) -> (b f) (h w) (c p q)"
        patches = rearrange(x, patchify, p=p.patch_size, q=p.patch_size)  # (B*F, N, C*p*p)
        img = self.x_embedder(patches)  # (B*F, N, D)
        if structure is not None:
            if self.structure_embedder is None or structure.shape != (b, f, p.structure_channels, h, w):
                raise ValueError(f"structure of shape {tuple(structure.shape)} does not fit "
                                 f"{(b, f, p.structure_channels, h, w)}")  # fmt: skip
            s_patches = rearrange(structure.to(x.dtype), patchify, p=p.patch_size, q=p.patch_size)  # (B*F, N, S*p*p)
            img = img + self.structure_embedder(s_patches)  # (B*F, N, D): the concatenated channels' embedding
        img = (img + self.pos_embed(hp, wp)).to(x.dtype)  # (B*F, N, D)
        # Per-clip inputs are repeated per frame before they are embedded (a few % of the cost), so that every
        # frame runs the image model's computation with the same matrix shapes: bit for bit at initialisation.
        per_frame = lambda v: repeat(v, "b ... -> (b f) ...", f=f)
        ctx = self.context_embedder(per_frame(context))  # (B*F, L, D)
        t_freq = timestep_embedding(per_frame(t.expand(b)) * p.timestep_scale, TIME_FREQ_DIM).to(x.dtype)
        cond = self.t_embedder(t_freq) + self.y_embedder(per_frame(pooled))  # (B*F, D)
        if structure_level is not None:
            level = per_frame(structure_level.expand(b)) * p.timestep_scale  # (B*F,)
            cond = cond + self.ts_embedder(timestep_embedding(level, TIME_FREQ_DIM).to(x.dtype))  # (B*F, D)
        vec = F.silu(cond)  # (B*F, D), SiLU shared by all modulations

        attn_mask = None
        if context_mask is not None:
            keep_img = torch.ones(b * f, hp * wp, dtype=torch.bool, device=x.device)
            attn_mask = torch.cat([keep_img, per_frame(context_mask.bool())], dim=1)[:, None, None]  # (B*F,1,1,N+L)

        run_temporal = temporal and f > 1
        for i, block in enumerate(self.blocks):
            img, ctx = block(img, ctx, vec, attn_mask)  # (B*F, N, D), (B*F, L, D) or None after the last block
            if run_temporal and i in self._temporal_of:
                img = self.temporal_blocks[self._temporal_of[i]](img, vec, f)  # (B*F, N, D)

        scale, shift = _modulation(self.final_mod, vec)  # (B*F, 1, D) each
        img = torch.addcmul(shift, _layer_norm(img, _norm_weight(img)), 1 + scale)  # (B*F, N, D)
        img = self.final_proj(img)  # (B*F, N, p*p*C_out)
        unpatchify = "(b f) (h w) (p q c) -> b f c (h p) (w q)"
        return rearrange(img, unpatchify, b=b, h=hp, p=p.patch_size, q=p.patch_size)  # (B, F, C, h, w)


Content = tuple[Tensor, Tensor, Tensor]  # (tokens (B, L, Dc), mask (B, L) bool, pooled (B, Dp))


def pad_content(content: Content, length: int) -> Content:
    """Content with its tokens and mask zero-padded (mask False) to `length` tokens."""
    tokens, mask, pooled = content
    pad = length - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, pad)), F.pad(mask, (0, pad)), pooled


def branch_predictor(
    model: VideoMMDiT,
    content: Content,
    null: Content,
    structure: Tensor | None,
    structure_level: Tensor | None,
) -> Callable[[Tensor, Tensor, Sequence], list[Tensor]]:
    """A `kinema.sampling.temporal.BranchPredictor` over `model`: content or null content, temporal on or off.

    Branches that share a temporal flag run as one batched evaluation, conditional half first (as the image
    denoiser batches classifier-free guidance). `null` (1 or B rows) is the empty prompt's content.
    """
    b = content[0].shape[0]
    length = max(content[0].shape[1], null[0].shape[1])
    cond = pad_content(content, length)
    uncond = tuple(v.expand(b, *v.shape[1:]) for v in pad_content(null, length))

    def run(x: Tensor, t: Tensor, flags: list[bool], temporal: bool) -> list[Tensor]:
        parts = [cond if c else uncond for c in flags]
        tokens, mask, pooled = (torch.cat([part[i] for part in parts]) for i in range(3))
        n = len(flags)
        rep = (lambda v: None if v is None else torch.cat([v] * n)) if n > 1 else (lambda v: v)
        v = model(rep(x), rep(t), tokens, pooled, mask, structure=rep(structure), structure_level=rep(structure_level),
                  temporal=temporal)  # fmt: skip
        return list(v.chunk(n)) if n > 1 else [v]

    def predict(x: Tensor, t: Tensor, branches) -> list[Tensor]:
        out = {}
        for temporal in (False, True):
            group = sorted({br.conditional for br in branches if br.temporal == temporal}, reverse=True)
            if group:
                out.update({(c, temporal): v for c, v in zip(group, run(x, t, group, temporal), strict=True)})
        return [out[(br.conditional, br.temporal)] for br in branches]

    return predict


def disparity(depth: Tensor, eps: float = 1e-6) -> Tensor:
    """Inverse depth: what monocular depth networks (MiDaS, `kinema.nn.depth`) predict, up to scale and shift."""
    return 1.0 / depth.clamp_min(eps)


def structure_input(disp: Tensor, size: tuple[int, int]) -> Tensor:
    """Per-frame disparity (B, F, H, W) -> structure channels (B, F, 1, h, w) in [-1, 1] at the latent size.

    Normalised per clip by its minimum and maximum, so the result does not change under any positive scale and
    shift of the disparity: the exact world depth and a depth network's relative prediction look alike, and one
    normalisation for the whole clip keeps frames comparable. Area-resampled to the latent size `size`.
    """
    b = disp.shape[0]
    flat = disp.reshape(b, -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values  # (B,)
    span = (hi - lo).clamp_min(1e-8)
    norm = (disp - lo[:, None, None, None]) / span[:, None, None, None] * 2 - 1  # (B, F, H, W)
    small = F.interpolate(rearrange(norm, "b f h w -> (b f) 1 h w"), size=size, mode="area")  # (B*F, 1, h, w)
    return rearrange(small, "(b f) c h w -> b f c h w", b=b)  # (B, F, 1, h, w)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of x (N, C, H, W) with replicate padding; sigma in pixels (0 returns x)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    row, col = k.view(1, 1, 1, -1).expand(c, 1, 1, -1), k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), row, groups=c)  # along W
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), col, groups=c)  # along H


def degrade_structure(structure: Tensor, level: Tensor, max_sigma: float = 1.5) -> Tensor:
    """Gen-1's structure-fidelity control (sec. 3.3): structure with detail removed according to t_s in [0, 1].

    structure (B, F, S, h, w), level (B,). Each clip is down-sampled to side h * 2^(-t_s * log2(h / 2)) (so t_s = 1
    keeps a 2 x 2 image), up-sampled back bilinearly, then Gaussian-blurred with sigma = t_s * max_sigma latent
    pixels: both losses grow with t_s and t_s = 0 returns the input unchanged. Gen-1 applies such a blur/down-
    sampling process to its depth maps with a level drawn at random during training and given to the network,
    which makes the level an inference-time dial between following the input's structure closely (0) and
    loosely (1).
    """
    if level.shape != structure.shape[:1]:
        raise ValueError(f"level must be (B,) = {tuple(structure.shape[:1])}, got {tuple(level.shape)}")
    if ((level < 0) | (level > 1)).any():
        raise ValueError("structure level t_s must lie in [0, 1]")
    h, w = structure.shape[-2:]
    out = []
    for clip, t_s in zip(structure, level.tolist(), strict=True):  # (F, S, h, w): a level per clip
        if t_s == 0:
            out.append(clip)
            continue
        steps = t_s * math.log2(max(h, w) / 2)
        size = (max(2, round(h * 2**-steps)), max(2, round(w * 2**-steps)))
        small = F.interpolate(clip, size=size, mode="area")  # (F, S, h', w')
        back = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)  # (F, S, h, w)
        out.append(_gaussian_blur(back, t_s * max_sigma))
    return torch.stack(out)  # (B, F, S, h, w)


def load_video_denoiser(path: str | Path) -> VideoMMDiT:
    """A VideoMMDiT (eval mode) from a checkpoint written by `kinema.train.video` (params in its metadata)."""
    from safetensors.torch import load_file

    from kinema.nn.checkpoint import params_from_metadata

    model = VideoMMDiT(params_from_metadata(Path(path), VideoMMDiTParams))
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
