"""Load diffusers-format SD3 / SD3.5 transformer checkpoints (`SD3Transformer2DModel`) into `MMDiT`.

Reads `config.json` and safetensors only (a single file or a sharded index), never pickle. The key
mapping is explicit: every diffusers tensor is either mapped or reported, so a checkpoint that does not
fit raises a `ValueError` naming the missing and unexpected keys instead of loading half a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from kinema.nn.checkpoint import load_safetensors_folder
from kinema.nn.mmdit import MMDiT, MMDiTParams, pos_table

# our module -> diffusers module(s); several sources are concatenated along dim 0 (fused q, k, v).
_TOP: dict[str, tuple[str, ...]] = {
    "x_embedder": ("pos_embed.proj",),
    "t_embedder.linear_1": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.linear_2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder.linear_1": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.linear_2": ("time_text_embed.text_embedder.linear_2",),
    "context_embedder": ("context_embedder",),
    "final_mod": ("norm_out.linear",),
    "final_proj": ("proj_out",),
}
_BLOCK: dict[str, tuple[str, ...]] = {
    "img_mod": ("norm1.linear",),
    "txt_mod": ("norm1_context.linear",),
    "img_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_q_norm": ("attn.norm_q",),
    "img_k_norm": ("attn.norm_k",),
    "txt_q_norm": ("attn.norm_added_q",),
    "txt_k_norm": ("attn.norm_added_k",),
    "img_proj": ("attn.to_out.0",),
    "txt_proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_qkv2": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "img_q_norm2": ("attn2.norm_q",),
    "img_k_norm2": ("attn2.norm_k",),
    "img_proj2": ("attn2.to_out.0",),
}
_POS_EMBED_KEY = "pos_embed.pos_embed"  # fixed sin-cos grid; recomputed by MMDiT, only checked here


def mmdit_params_from_diffusers_config(config: dict[str, Any]) -> MMDiTParams:
    """MMDiTParams from a diffusers `SD3Transformer2DModel` config.json dict (missing keys take diffusers' defaults)."""
    if config.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise ValueError(f"expected an SD3Transformer2DModel config, got {config['_class_name']}")
    heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
    hidden = heads * head_dim
    if (caption := config.get("caption_projection_dim", 1152)) != hidden:
        raise ValueError(
            f"caption_projection_dim {caption} must equal num_attention_heads * attention_head_dim {hidden}"
        )
    qk_norm = config.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise ValueError(f"qk_norm {qk_norm!r} is not supported (None or 'rms_norm')")
    sample_size, patch_size = config.get("sample_size", 128), config.get("patch_size", 2)
    in_channels = config.get("in_channels", 16)
    return MMDiTParams(
        in_channels=in_channels,
        out_channels=config.get("out_channels") or in_channels,
        patch_size=patch_size,
        sample_size=sample_size,
        # Without a max size diffusers uses the sample_size grid itself; larger latents are then rejected here.
        pos_embed_max_size=config.get("pos_embed_max_size", 96) or sample_size // patch_size,
        depth=config.get("num_layers", 18),
        hidden_size=hidden,
        num_heads=heads,
        context_dim=config.get("joint_attention_dim", 4096),
        pooled_dim=config.get("pooled_projection_dim", 2048),
        qk_norm=qk_norm == "rms_norm",
        dual_attention_layers=tuple(config.get("dual_attention_layers") or ()),
    )


def diffusers_config_from_params(params: MMDiTParams) -> dict[str, Any]:
    """The SD3Transformer2DModel config with the same network as `params` (inverse of the function above)."""
    if params.mlp_ratio != 4.0 or params.timestep_scale != 1000.0:
        raise ValueError("diffusers' SD3Transformer2DModel fixes mlp_ratio 4 and timestep_scale 1000")
    return {
        "sample_size": params.sample_size,
        "patch_size": params.patch_size,
        "in_channels": params.in_channels,
        "num_layers": params.depth,
        "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads,
        "joint_attention_dim": params.context_dim,
        "caption_projection_dim": params.hidden_size,
        "pooled_projection_dim": params.pooled_dim,
        "out_channels": params.out_channels,
        "pos_embed_max_size": params.pos_embed_max_size,
        "dual_attention_layers": tuple(params.dual_attention_layers),
        "qk_norm": "rms_norm" if params.qk_norm else None,
    }


def _source_keys(key: str) -> tuple[str, ...]:
    """diffusers keys that make up our state-dict `key` (empty if it has no counterpart)."""
    module, param = key.rsplit(".", 1)
    if module.startswith("blocks."):
        _, i, inner = module.split(".", 2)
        return tuple(f"transformer_blocks.{i}.{src}.{param}" for src in _BLOCK.get(inner, ()))
    return tuple(f"{src}.{param}" for src in _TOP.get(module, ()))


def _check_pos_embed(grid: Tensor, params: MMDiTParams) -> None:
    """The checkpoint's position grid must be the fixed sin-cos grid MMDiT computes (checked on a sparse lattice)."""
    m, d = params.pos_embed_max_size, params.hidden_size
    if grid.numel() != m * m * d:
        raise ValueError(f"{_POS_EMBED_KEY} has shape {tuple(grid.shape)}, expected (1, {m * m}, {d})")
    table = pos_table(params)  # (M, D/2)
    idx = torch.linspace(0, m - 1, min(m, 9)).long()
    ours = torch.cat([table[idx][None].expand(len(idx), -1, -1), table[idx][:, None].expand(-1, len(idx), -1)], -1)
    theirs = grid.reshape(m, m, d)[idx][:, idx].float().cpu()  # (k, k, D), [row, col]
    tol = 1e-5 if grid.dtype == torch.float32 else 1e-2
    if not torch.allclose(ours, theirs, atol=tol):
        raise ValueError(f"{_POS_EMBED_KEY} is not the 2D sin-cos grid for sample_size {params.sample_size}")


def convert_sd3_transformer_state_dict(sd: dict[str, Tensor], params: MMDiTParams) -> dict[str, Tensor]:
    """Map a diffusers SD3Transformer2DModel state dict onto MMDiT keys (fusing q, k, v; flattening the patch conv)."""
    with torch.device("meta"):
        expected = MMDiT(params).state_dict()
    out: dict[str, Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()
    for key in expected:
        srcs = _source_keys(key)
        if not srcs or any(s not in sd for s in srcs):
            missing += [s for s in srcs if s not in sd] or [key]
            continue
        used.update(srcs)
        tensor = torch.cat([sd[s] for s in srcs], dim=0) if len(srcs) > 1 else sd[srcs[0]]
        out[key] = tensor.flatten(1) if key == "x_embedder.weight" else tensor  # conv (D, C, p, p) -> (D, C*p*p)
    if _POS_EMBED_KEY in sd:
        used.add(_POS_EMBED_KEY)
        _check_pos_embed(sd[_POS_EMBED_KEY], params)
    unexpected = sorted(set(sd) - used)
    bad_shapes = [
        f"{'+'.join(_source_keys(k))} -> {k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in out.items()
        if v.shape != expected[k].shape
    ]
    if missing or unexpected or bad_shapes:
        raise ValueError(
            "diffusers SD3 checkpoint does not fit MMDiTParams: "
            f"missing {_clip(missing)}, unexpected {_clip(unexpected)}, shape mismatches {_clip(bad_shapes)}"
        )
    return out


def _clip(items: list[str], n: int = 8) -> str:
    return f"{items[:n]}" + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _read_safetensors(folder: Path) -> dict[str, Tensor]:
    """The folder's tensors: the (non-variant) sharded index if present, else the single file, else every file."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if not index.exists():
        index = next(iter(sorted(folder.glob("*.safetensors.index.json"))), index)
    if index.exists():
        state: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    single = folder / "diffusion_pytorch_model.safetensors"
    return load_file(single) if single.exists() else load_safetensors_folder(folder)


def mmdit_from_diffusers_state_dict(
    sd: dict[str, Tensor], params: MMDiTParams, dtype: torch.dtype | None = None
) -> MMDiT:
    """MMDiT holding a diffusers state dict's weights (on their device; cast to `dtype` if given), in eval mode."""
    state = convert_sd3_transformer_state_dict(sd, params)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    # Built on the meta device so full-size checkpoints are not allocated twice; the fixed table is recomputed.
    with torch.device("meta"):
        model = MMDiT(params)
    model.load_state_dict(state, strict=True, assign=True)
    model.pos_table = pos_table(params).to(next(iter(state.values())).device)
    return model.eval()


def load_sd3_transformer(path: str | Path, dtype: torch.dtype = torch.float32) -> MMDiT:
    """MMDiT from a diffusers transformer folder (config.json + safetensors) or a pipeline folder holding one."""
    folder = Path(path)
    if (folder / "transformer" / "config.json").exists():
        folder = folder / "transformer"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    params = mmdit_params_from_diffusers_config(json.loads((folder / "config.json").read_text()))
    return mmdit_from_diffusers_state_dict(_read_safetensors(folder), params, dtype)
