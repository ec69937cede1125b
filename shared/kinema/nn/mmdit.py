"""MMDiT: the multimodal diffusion transformer of SD3 (Esser et al. 2024, sec. 4 and fig. 2).

Image and text tokens keep separate weights (adaLN-zero modulation, QKV, output projection, MLP) and
meet in one joint attention over the concatenated sequence [image, text]. SD3.5 adds RMSNorm on
queries and keys (`qk_norm`) and, in the first blocks, a second self-attention over image tokens
only (MMDiT-X, `dual_attention_layers`). The computation is diffusers' `SD3Transformer2DModel`
operation for operation; `kinema.nn.sd3_loader` maps its checkpoints onto this module (the only
layout differences are fused QKV projections and a patch embedding written as a linear layer).

The network predicts the rectified-flow velocity v = eps - x0 for x_t = (1 - t) x0 + t eps, t in [0, 1].
For Self-Flow training (`kinema.train.self_flow`) t may also be given per image token: the image stream's
adaLN modulations are then computed token by token from each token's own time.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from kinema.nn.embeddings import MLPEmbedder, crop_pos_embed_2d, sincos_table, timestep_embedding

TIME_FREQ_DIM = 256  # width of the sinusoidal time features, fixed by SD3


@dataclass(frozen=True)
class MMDiTParams:
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2
    sample_size: int = 16  # latent side the position grid is scaled to (diffusers `sample_size`)
    pos_embed_max_size: int = 32  # side of the position grid, in patches; larger latents are rejected
    depth: int = 6
    hidden_size: int = 256
    num_heads: int = 4
    context_dim: int = 384  # width of the text tokens fed in (T5/CLIP in SD3, MiniLM here)
    pooled_dim: int = 384  # width of the pooled text vector
    qk_norm: bool = False  # RMSNorm (eps 1e-6) on per-head q and k of both streams (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # blocks with the extra image self-attention (SD3.5 MMDiT-X)
    mlp_ratio: float = 4.0
    timestep_scale: float = 1000.0  # t in [0, 1] is embedded as t * timestep_scale, as diffusers feeds it

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 for 2D sin-cos positions")
        if self.patch_size < 1 or self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}")
        if self.pos_embed_max_size < self.sample_size // self.patch_size:
            raise ValueError(
                f"pos_embed_max_size {self.pos_embed_max_size} is smaller than the "
                f"{self.sample_size // self.patch_size} patches of sample_size {self.sample_size}"
            )
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}")
        if bad := [i for i in self.dual_attention_layers if not 0 <= i < self.depth]:
            raise ValueError(f"dual_attention_layers {bad} are outside 0..{self.depth - 1}")
        if self.mlp_ratio <= 0 or (self.hidden_size * self.mlp_ratio) % 1:
            raise ValueError(f"hidden_size * mlp_ratio is not a positive integer: {self.hidden_size * self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS: dict[str, MMDiTParams] = {
    # Our shipped text encoder is all-MiniLM-L6-v2: 384-d tokens and pooled vector.
    "mini": MMDiTParams(),
    # What the shipped denoiser trains as: ~2x the samples/s of 'mini' on a 2-core CPU.
    "tiny": MMDiTParams(depth=4, hidden_size=192, num_heads=3),
    "small": MMDiTParams(
        in_channels=16, out_channels=16, sample_size=32, pos_embed_max_size=64, depth=12, hidden_size=512, num_heads=8
    ),
    # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    "sd3-medium": MMDiTParams(
        in_channels=16,
        out_channels=16,
        sample_size=128,
        pos_embed_max_size=192,
        depth=24,
        hidden_size=1536,
        num_heads=24,
        context_dim=4096,
        pooled_dim=2048,
    ),
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    "sd3.5-medium": MMDiTParams(
        in_channels=16,
        out_channels=16,
        sample_size=128,
        pos_embed_max_size=384,
        depth=24,
        hidden_size=1536,
        num_heads=24,
        context_dim=4096,
        pooled_dim=2048,
        qk_norm=True,
        dual_attention_layers=tuple(range(13)),
    ),
}


def pos_table(p: MMDiTParams) -> Tensor:
    """The 1D sin-cos table (pos_embed_max_size, hidden_size / 2) from which the 2D position grid is cropped."""
    return sincos_table(p.pos_embed_max_size, p.hidden_size // 2, p.sample_size // p.patch_size)


class TanhGELU(nn.Module):
    """GELU, tanh approximation (diffusers' "gelu-approximate"), fast for CPU inference.

    0.5 * (1 + tanh(u)) = sigmoid(2u): without autograd on CPU the sigmoid form is the same function and
    ~2x faster than ATen's tanh-GELU kernel; training and GPUs keep the fused F.gelu (faster backward).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return F.gelu(x, approximate="tanh")
        return _gelu_sigmoid(x, torch.empty_like(x))


_GELU_2U = 2 * math.sqrt(2 / math.pi)


def _gelu_sigmoid(x: Tensor, out: Tensor) -> Tensor:
    """Tanh-GELU of x written to `out` (same shape) as x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))."""
    torch.mul(x, x, out=out)
    torch.addcmul(x, out, x, value=0.044715, out=out)
    return out.mul_(_GELU_2U).sigmoid_().mul_(x)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), TanhGELU(), nn.Linear(hidden, dim))


# Hidden activations per MLP chunk without autograd (16 MB in fp32): 2048 rows of a 2048-wide hidden, so that
# GEMMs keep enough rows to run near peak; whatever the batch and latent size, the buffers stay bounded.
_MLP_CHUNK_ELEMENTS = 1 << 22
# Per thread and (device, dtype, inference mode): the two hidden-activation buffers `_run_mlp` reuses. Every call
# uses them only while it runs, so models and calls in one thread can share them.
_MLP_BUFFERS = threading.local()


def _mlp_buffers(like: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """Two flat buffers of at least `numel` elements with like's device and dtype, reused across calls."""
    if not hasattr(_MLP_BUFFERS, "by_kind"):
        _MLP_BUFFERS.by_kind = {}
    # Buffers made under inference_mode are inference tensors, which a later no_grad call may not write: keep apart.
    key = (like.device, like.dtype, torch.is_inference_mode_enabled())
    if key not in _MLP_BUFFERS.by_kind or _MLP_BUFFERS.by_kind[key][0].numel() < numel:
        _MLP_BUFFERS.by_kind[key] = (like.new_empty(numel), like.new_empty(numel))
    return _MLP_BUFFERS.by_kind[key]


def _run_mlp(mlp: nn.Sequential, x: Tensor, buffered: bool) -> Tensor:
    """mlp(x) for x (B, S, D); if `buffered` (CPU, no autograd), over row chunks whose hidden reuses buffers.

    A fresh multi-MB hidden per block can cost ~5-15% of a CPU forward in page faults: glibc hands large
    freed blocks back to the OS, and the next allocation faults them in again page by page.
    """
    if not buffered:
        return mlp(x)
    fc1, fc2 = mlp[0], mlp[2]
    rows = x.flatten(0, -2)  # (B*S, D)
    n, hidden = rows.shape[0], fc1.out_features
    step = min(n, max(1, _MLP_CHUNK_ELEMENTS // hidden))
    h_buf, g_buf = _mlp_buffers(rows, step * hidden)
    out = rows.new_empty(n, fc2.out_features)  # (B*S, D)
    for i in range(0, n, step):
        m = min(step, n - i)
        h = torch.addmm(fc1.bias, rows[i : i + m], fc1.weight.t(), out=h_buf[: m * hidden].view(m, hidden))  # (m, F)
        h = _gelu_sigmoid(h, g_buf[: m * hidden].view(m, hidden))  # (m, F)
        torch.addmm(fc2.bias, h, fc2.weight.t(), out=out[i : i + m])  # (m, D)
    return out.view(x.shape)  # (B, S, D)


def _layer_norm(x: Tensor, weight: Tensor | None) -> Tensor:
    """LayerNorm over the last dim, eps 1e-6, with no learned affine (SD3's pre-modulation norm).

    On CPU pass weight = ones: ATen's CPU kernel runs ~3x slower without an affine, for the same result.
    """
    return F.layer_norm(x, x.shape[-1:], weight, eps=1e-6)


def _norm_weight(x: Tensor) -> Tensor | None:
    """The identity LayerNorm weight `_layer_norm` wants for tensors like x: ones on CPU, None elsewhere."""
    return x.new_ones(x.shape[-1]) if x.device.type == "cpu" else None


def _modulation(layer: nn.Linear, vec: Tensor) -> tuple[Tensor, ...]:
    """layer(vec) for vec (B, D), split into (B, 1, D) chunks.

    Computed as W @ vec^T: for a handful of rows MKL runs this orientation ~1.3x faster than vec @ W^T, and
    the modulation layers hold a third of a block's weights. The small result is made contiguous because
    elementwise kernels broadcast a strided (B, 1, D) operand ~3x slower.
    """
    out = torch.addmm(layer.bias[:, None], layer.weight, vec.t()).t().contiguous()  # (B, k*D)
    return out[:, None].chunk(layer.out_features // vec.shape[-1], dim=-1)


@dataclass(frozen=True)
class TokenConditioning:
    """Per-image-token conditioning: token (b, n) is conditioned on vec[index[b, n]].

    Per-token times take few distinct values per sample (two under Self-Flow), so the modulations are computed
    once per distinct (sample, time) row and gathered, not once per token.
    """

    vec: Tensor  # (U, D), SiLU(conditioning) of each distinct (sample, time)
    index: Tensor  # (B, N) long, row of vec for each image token

    def modulation(self, layer: nn.Linear) -> tuple[Tensor, ...]:
        """layer(vec) gathered to the tokens and split into (B, N, D) chunks."""
        return layer(self.vec)[self.index].chunk(layer.out_features // self.vec.shape[-1], dim=-1)


def _modulate(h: Tensor, shift: Tensor, scale: Tensor, inplace: bool) -> Tensor:
    """adaLN: h * (1 + scale) + shift for normalised h (B, S, D) and (B, 1, D) modulations; `inplace` overwrites h."""
    return torch.addcmul(shift, h, 1 + scale, out=h if inplace else None)


def _gated_residual(x: Tensor, gate: Tensor, y: Tensor, inplace: bool) -> Tensor:
    """x + gate * y for sub-layer output y (B, S, D) and gate (B, 1, D); `inplace` overwrites y, never x."""
    return torch.addcmul(x, gate, y, out=y if inplace else None)


def _qk_norm(p: MMDiTParams) -> nn.Module | None:
    return nn.RMSNorm(p.head_dim, eps=1e-6) if p.qk_norm else None


class JointBlock(nn.Module):
    """One MMDiT block (SD3 fig. 2b); `context_pre_only` (last block) drops the text-stream update."""

    def __init__(self, p: MMDiTParams, context_pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        d, mlp_hidden = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
        self.heads, self.context_pre_only, self.dual_attention = p.num_heads, context_pre_only, dual_attention
        # Modulation chunks keep diffusers' order: (shift, scale, gate) per sub-layer; pre-only text: (scale, shift).
        self.img_mod = nn.Linear(d, (9 if dual_attention else 6) * d)
        self.img_qkv = nn.Linear(d, 3 * d)
        self.img_q_norm, self.img_k_norm = _qk_norm(p), _qk_norm(p)
        self.img_proj = nn.Linear(d, d)
        self.img_mlp = _mlp(d, mlp_hidden)
        self.txt_mod = nn.Linear(d, (2 if context_pre_only else 6) * d)
        self.txt_qkv = nn.Linear(d, 3 * d)
        self.txt_q_norm, self.txt_k_norm = _qk_norm(p), _qk_norm(p)
        if not context_pre_only:
            self.txt_proj = nn.Linear(d, d)
            self.txt_mlp = _mlp(d, mlp_hidden)
        if dual_attention:
            self.img_qkv2 = nn.Linear(d, 3 * d)
            self.img_q_norm2, self.img_k_norm2 = _qk_norm(p), _qk_norm(p)
            self.img_proj2 = nn.Linear(d, d)

    def _heads(self, qkv: Tensor, q_norm: nn.Module | None, k_norm: nn.Module | None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(qkv, "b s (three h d) -> three b h s d", three=3, h=self.heads)  # 3 x (B, H, S, d) views
        q = q if q_norm is None else q_norm(q)
        k = k if k_norm is None else k_norm(k)
        return q, k, v

    @staticmethod
    def _attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Attention of q (B, H, S, d) over k, v (B, H, S', d) -> (B, S, H*d), a view of SDPA's output."""
        return rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), "b h s d -> b s (h d)")

    def forward(
        self, x: Tensor, ctx: Tensor, vec: Tensor, attn_mask: Tensor | None, tokens: TokenConditioning | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D) image tokens, ctx (B, L, D) text tokens, vec (B, D) = SiLU(conditioning).

        `tokens`, if given, conditions the image tokens one by one (per-token flow times); vec the text.
        """
        im = _modulation(self.img_mod, vec) if tokens is None else tokens.modulation(self.img_mod)
        tm = _modulation(self.txt_mod, vec)  # 6 or 2 x (B, 1, D)

        # Without autograd on CPU, results overwrite this block's own temporaries and MLPs reuse buffers.
        inplace = x.device.type == "cpu" and not torch.is_grad_enabled()
        ln_w = _norm_weight(x)
        x_ln = _layer_norm(x, ln_w)  # (B, N, D)
        ctx_ln = _layer_norm(ctx, ln_w)  # (B, L, D)
        ctx_shift, ctx_scale = (tm[1], tm[0]) if self.context_pre_only else (tm[0], tm[1])
        ctx_in = _modulate(ctx_ln, ctx_shift, ctx_scale, inplace)  # (B, L, D)
        x_in = _modulate(x_ln, im[0], im[1], inplace and not self.dual_attention)  # (B, N, D)
        qi, ki, vi = self._heads(self.img_qkv(x_in), self.img_q_norm, self.img_k_norm)  # (B, H, N, d)
        # Text queries only feed text outputs, which the pre-only (last) block discards.
        txt_q_norm = None if self.context_pre_only else self.txt_q_norm
        qt, kt, vt = self._heads(self.txt_qkv(ctx_in), txt_q_norm, self.txt_k_norm)  # (B, H, L, d)
        k, v = torch.cat([ki, kt], dim=2), torch.cat([vi, vt], dim=2)  # (B, H, N+L, d), contiguous
        # Joint attention, one call per query stream: the same result as one call over [image, text] queries,
        # without concatenating queries or slicing the output apart again.
        out = self._attend(qi, k, v, attn_mask)  # (B, N, D)

        x = _gated_residual(x, im[2], self.img_proj(out), inplace)  # (B, N, D)
        if self.dual_attention:
            x_in2 = _modulate(x_ln, im[6], im[7], inplace)  # (B, N, D)
            out2 = self._attend(*self._heads(self.img_qkv2(x_in2), self.img_q_norm2, self.img_k_norm2))  # (B, N, D)
            x = _gated_residual(x, im[8], self.img_proj2(out2), inplace)  # (B, N, D)
        x_mlp_in = _modulate(_layer_norm(x, ln_w), im[3], im[4], inplace)  # (B, N, D)
        x = _gated_residual(x, im[5], _run_mlp(self.img_mlp, x_mlp_in, inplace), inplace)  # (B, N, D)
        if self.context_pre_only:
            return x, None

        out_txt = self._attend(qt, k, v, attn_mask)  # (B, L, D)
        ctx = _gated_residual(ctx, tm[2], self.txt_proj(out_txt), inplace)  # (B, L, D)
        ctx_mlp_in = _modulate(_layer_norm(ctx, ln_w), tm[3], tm[4], inplace)  # (B, L, D)
        ctx = _gated_residual(ctx, tm[5], _run_mlp(self.txt_mlp, ctx_mlp_in, inplace), inplace)  # (B, L, D)
        return x, ctx


class MMDiT(nn.Module):
    """Rectified-flow velocity network: (x_t, t, text tokens, pooled text) -> v."""

    def __init__(self, params: MMDiTParams):
        super().__init__()
        self.params = p = params
        d = p.hidden_size
        # Patch embedding as a linear layer over (c p q) patches: the same map as a stride-p Conv2d, cheaper on CPU.
        self.x_embedder = nn.Linear(p.in_channels * p.patch_size**2, d)
        self.register_buffer("pos_table", pos_table(p), persistent=False)  # (M, D/2), fixed
        self.t_embedder = MLPEmbedder(TIME_FREQ_DIM, d)
        self.y_embedder = MLPEmbedder(p.pooled_dim, d)
        self.context_embedder = nn.Linear(p.context_dim, d)
        self.blocks = nn.ModuleList(
            JointBlock(p, context_pre_only=i == p.depth - 1, dual_attention=i in p.dual_attention_layers)
            for i in range(p.depth)
        )
        self.final_mod = nn.Linear(d, 2 * d)  # (scale, shift) as diffusers' AdaLayerNormContinuous
        self.final_proj = nn.Linear(d, p.patch_size**2 * p.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.t_embedder, self.y_embedder):
            nn.init.normal_(emb.linear_1.weight, std=0.02)
            nn.init.normal_(emb.linear_2.weight, std=0.02)
        # adaLN-zero (DiT sec. 3.2): every block starts as the identity and the output as zero.
        zero = [self.final_mod, self.final_proj] + [m for b in self.blocks for m in (b.img_mod, b.txt_mod)]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def pos_embed(self, h: int, w: int) -> Tensor:
        """Fixed 2D sin-cos positions for an h x w patch grid, centre-cropped from the max grid: (h*w, D)."""
        return crop_pos_embed_2d(self.pos_table, h, w)

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, context_mask: Tensor | None = None
    ) -> Tensor:
        """Velocity for latents x (B, C, H, W) at flow times t given context (B, L, Dc), pooled (B, Dp).

        t is (B,) (or broadcastable to it), or (B, N) with one time per image token in raster order of the
        patch grid (N = H*W / patch_size^2). context_mask (B, L) bool marks real text tokens; padded ones are
        excluded as attention keys.
        """
        return self.forward_features(x, t, context, pooled, context_mask)[0]

    def forward_features(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor,
        context_mask: Tensor | None = None,
        layers: tuple[int, ...] = (),
    ) -> tuple[Tensor, list[Tensor]]:
        """(velocity, image tokens (B, N, D) after each block count in `layers`), as `forward` takes its inputs.

        Layer k is the image stream after the first k blocks (1..depth): what Self-Flow aligns.
        """
        p = self.params
        b, _, h, w = x.shape
        if h % p.patch_size or w % p.patch_size:
            raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size {p.patch_size}")
        if bad := [k for k in layers if not 1 <= k <= p.depth]:
            raise ValueError(f"feature layers {bad} are outside 1..{p.depth}")
        hp, wp = h // p.patch_size, w // p.patch_size
        patches = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p.patch_size, q=p.patch_size)  # (B, N, C*p*p)
        img = (self.x_embedder(patches) + self.pos_embed(hp, wp)).to(x.dtype)  # (B, N, D), sum in fp32 as diffusers
        ctx = self.context_embedder(context)  # (B, L, D)
        y = self.y_embedder(pooled)  # (B, D)
        per_token = None
        if t.dim() == 2:  # one time per image token; the text stream sees their mean
            if t.shape != (b, hp * wp):
                raise ValueError(f"per-token times have shape {tuple(t.shape)}, expected {(b, hp * wp)}")
            sample = torch.arange(b, device=t.device, dtype=t.dtype)[:, None].expand_as(t)  # (B, N)
            rows, index = torch.unique(torch.stack([sample, t], dim=-1).view(-1, 2), dim=0, return_inverse=True)
            t_rows = timestep_embedding(rows[:, 1] * p.timestep_scale, TIME_FREQ_DIM).to(x.dtype)  # (U, 256)
            row_vec = F.silu(self.t_embedder(t_rows) + y[rows[:, 0].long()])  # (U, D)
            per_token = TokenConditioning(row_vec, index.view(b, hp * wp))
            t = t.mean(dim=1)  # (B,)
        t_freq = timestep_embedding(t.expand(b) * p.timestep_scale, TIME_FREQ_DIM).to(x.dtype)  # (B, 256)
        vec = F.silu(self.t_embedder(t_freq) + y)  # (B, D), SiLU shared by all modulations

        attn_mask = None
        if context_mask is not None:
            keep_img = torch.ones(b, hp * wp, dtype=torch.bool, device=x.device)
            attn_mask = torch.cat([keep_img, context_mask.bool()], dim=1)[:, None, None]  # (B, 1, 1, N+L)

        features = []
        for k, block in enumerate(self.blocks, start=1):
            img, ctx = block(img, ctx, vec, attn_mask, per_token)  # (B, N, D), (B, L, D) or None after the last block
            if k in layers:
                features.append(img)

        if per_token is None:
            scale, shift = _modulation(self.final_mod, vec)  # (B, 1, D) each
        else:
            scale, shift = per_token.modulation(self.final_mod)  # (B, N, D) each
        img = torch.addcmul(shift, _layer_norm(img, _norm_weight(img)), 1 + scale)  # (B, N, D)
        img = self.final_proj(img)  # (B, N, p*p*C_out)
        v = rearrange(img, "b (h w) (p q c) -> b c (h p) (w q)", h=hp, p=p.patch_size, q=p.patch_size)
        return v, features
