"""KL-regularised convolutional autoencoder (LDM, Rombach et al. 2022, sec. 3 and app. G).

Module names follow diffusers' `AutoencoderKL` exactly, so a diffusers checkpoint's state dict
loads with no key mapping (see `load_autoencoder_kl`). The latent normalisation
(`scaling_factor`, `shift_factor`) lives in `AutoencoderParams` and in the checkpoint, never in
pipeline code: `encode` returns normalised latents and `decode` expects them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class AutoencoderParams:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one level per entry; f = 2 ** (levels - 1)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 1.0  # z_model = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block width must divide into {self.norm_num_groups} groups: {self.block_out_channels}"
            )

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


PRESETS: dict[str, AutoencoderParams] = {
    "mini": AutoencoderParams(),
    # Twice the width and depth of 'mini', same latent (16x16x4 at 64 px): what ships when a GPU trains it.
    "small": AutoencoderParams(block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=16),
    # The SD3 autoencoder's shape (16 latent channels, f=8), for loading real checkpoints.
    "sd3": AutoencoderParams(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ),
}


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention of the autoencoder's middle block."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)  # (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        out = rearrange(self.to_out[0](out), "b (h w) c -> b c h w", h=h, w=w)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as LDM


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, resnets: list[nn.Module], sampler: nn.Module | None, name: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        setattr(self, name, nn.ModuleList([sampler] if sampler is not None else []))
        self._sampler_name = name

    def forward(self, x: Tensor) -> Tensor:
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, self._sampler_name):
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, p: AutoencoderParams) -> None:
        super().__init__()
        ch, g = p.block_out_channels, p.norm_num_groups
        self.conv_in = nn.Conv2d(p.in_channels, ch[0], 3, padding=1)
        levels, prev = [], ch[0]
        for i, c in enumerate(ch):
            resnets = [ResnetBlock2D(prev if j == 0 else c, c, g) for j in range(p.layers_per_block)]
            levels.append(_Level(resnets, Downsample(c) if i < len(ch) - 1 else None, "downsamplers"))
            prev = c
        self.down_blocks = nn.ModuleList(levels)
        self.mid_block = MidBlock(ch[-1], g, p.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * p.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # (B, C0, H, W)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2 * latent, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, p: AutoencoderParams) -> None:
        super().__init__()
        ch, g = tuple(reversed(p.block_out_channels)), p.norm_num_groups
        self.conv_in = nn.Conv2d(p.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, p.mid_block_add_attention)
        levels, prev = [], ch[0]
        for i, c in enumerate(ch):
            resnets = [ResnetBlock2D(prev if j == 0 else c, c, g) for j in range(p.layers_per_block + 1)]
            levels.append(_Level(resnets, Upsample(c) if i < len(ch) - 1 else None, "upsamplers"))
            prev = c
        self.up_blocks = nn.ModuleList(levels)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], p.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 3, H, W)


@dataclass(frozen=True)
class LatentDistribution:
    """Diagonal Gaussian posterior q(z|x) in raw (unnormalised) latent units."""

    mean: Tensor
    logvar: Tensor

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over latent dims, per sample: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class Autoencoder(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) <-> normalised latents (B, latent, H/f, W/f)."""

    def __init__(self, params: AutoencoderParams) -> None:
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        c2 = 2 * params.latent_channels
        self.quant_conv = nn.Conv2d(c2, c2, 1) if params.use_quant_conv else None
        lc = params.latent_channels
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if params.use_post_quant_conv else None

    def posterior(self, x: Tensor) -> LatentDistribution:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))

    def decode_raw(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Normalised latents: the posterior mean (or a sample), shifted and scaled."""
        post = self.posterior(x)
        z = post.sample(generator) if sample else post.mean
        return (z - self.params.shift_factor) * self.params.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        return self.decode_raw(z / self.params.scaling_factor + self.params.shift_factor)


def params_from_diffusers_config(config: dict) -> AutoencoderParams:
    """AutoencoderParams from a diffusers `AutoencoderKL` config.json dict."""
    if config.get("down_block_types") and any(t != "DownEncoderBlock2D" for t in config["down_block_types"]):
        raise ValueError(f"unsupported down blocks {config['down_block_types']}: only DownEncoderBlock2D")
    known = {f.name for f in fields(AutoencoderParams)}
    kwargs = {k: v for k, v in config.items() if k in known and v is not None}
    if "block_out_channels" in kwargs:
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return AutoencoderParams(**kwargs)


def load_autoencoder_kl(path: str | Path) -> Autoencoder:
    """Load a diffusers-format AutoencoderKL folder (config.json + safetensors); keys map 1:1."""
    from kinema.nn.checkpoint import load_safetensors_folder

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: expected a diffusers AutoencoderKL folder")
    model = Autoencoder(params_from_diffusers_config(json.loads(config_file.read_text())))
    state = load_safetensors_folder(folder)
    # Old LDM checkpoints store the attention projections as 1x1 convolutions.
    state = {k: v.flatten(1) if "attentions" in k and v.ndim == 4 else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint in {folder} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
