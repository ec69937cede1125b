import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

from kinema.nn.mmdit import PRESETS, MMDiT
from kinema.nn.sd3_loader import (
    convert_sd3_transformer_state_dict,
    diffusers_config_from_params,
    load_sd3_transformer,
    mmdit_params_from_diffusers_config,
)

TINY_SD3 = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 12,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 10,
    "out_channels": 4,
    "pos_embed_max_size": 12,
}
CONFIGS = {
    "sd3": TINY_SD3,
    "sd3.5": {**TINY_SD3, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)},
}
# transformer/config.json of the released checkpoints
SD3_MEDIUM = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}
SD35_MEDIUM = {
    **SD3_MEDIUM,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "dual_attention_layers": list(range(13)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """A randomly initialised diffusers model saved with save_pretrained (safetensors)."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIGS[request.param]).eval()
    with torch.no_grad():  # diffusers zero-inits nothing, but keep every weight well away from trivial values
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _inputs(b=2, h=8, w=8, seq=5):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(b, 4, h, w, generator=g),
        torch.rand(b, generator=g),
        torch.randn(b, seq, 12, generator=g),
        torch.randn(b, 10, generator=g),
    )


@pytest.mark.parametrize(("h", "w"), [(8, 8), (8, 6), (16, 24)])
def test_loaded_model_matches_diffusers(saved, h, w):
    reference, folder = saved
    ours = load_sd3_transformer(folder)
    x, t, ctx, pooled = _inputs(h=h, w=w)
    with torch.no_grad():
        expected = reference(x, ctx, pooled, t * 1000).sample
        got = ours(x, t, ctx, pooled)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_sharded_checkpoint_loads(saved, tmp_path):
    reference, _ = saved
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = load_sd3_transformer(tmp_path)
    x, t, ctx, pooled = _inputs()
    with torch.no_grad():
        assert torch.allclose(ours(x, t, ctx, pooled), reference(x, ctx, pooled, t * 1000).sample, atol=1e-5)


def test_unexpected_and_missing_keys_are_listed(saved):
    reference, folder = saved
    params = mmdit_params_from_diffusers_config(json.loads((folder / "config.json").read_text()))
    sd = dict(reference.state_dict())
    sd["transformer_blocks.0.attn.extra.weight"] = torch.zeros(1)
    del sd["transformer_blocks.1.attn.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing \['transformer_blocks.1.attn.to_k.weight'\].*attn.extra.weight"):
        convert_sd3_transformer_state_dict(sd, params)


def test_shape_mismatch_and_foreign_pos_embed_raise(saved):
    reference, folder = saved
    params = mmdit_params_from_diffusers_config(json.loads((folder / "config.json").read_text()))
    sd = dict(reference.state_dict())
    bad = {**sd, "proj_out.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"proj_out\.bias -> final_proj\.bias \(3,\)"):
        convert_sd3_transformer_state_dict(bad, params)
    bad = {**sd, "pos_embed.pos_embed": torch.randn_like(sd["pos_embed.pos_embed"])}
    with pytest.raises(ValueError, match="sin-cos"):
        convert_sd3_transformer_state_dict(bad, params)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_SD3))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_sd3_transformer(tmp_path)


def test_single_file_with_other_name_loads(saved, tmp_path):
    reference, folder = saved
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    assert isinstance(load_sd3_transformer(tmp_path), MMDiT)


@pytest.mark.parametrize(("config", "preset"), [(SD3_MEDIUM, "sd3-medium"), (SD35_MEDIUM, "sd3.5-medium")])
def test_released_configs_map_to_presets_with_same_parameter_count(config, preset):
    params = mmdit_params_from_diffusers_config(config)
    assert params == PRESETS[preset]
    assert mmdit_params_from_diffusers_config(diffusers_config_from_params(params)) == params
    with torch.device("meta"):
        ours = sum(p.numel() for p in MMDiT(params).parameters())
        theirs = sum(p.numel() for p in SD3Transformer2DModel(**config).parameters())
    assert ours == theirs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"_class_name": "FluxTransformer2DModel"}, "SD3Transformer2DModel"),
        ({"caption_projection_dim": 16}, "caption_projection_dim"),
        ({"qk_norm": "layer_norm"}, "qk_norm"),
    ],
)
def test_unsupported_configs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        mmdit_params_from_diffusers_config({**TINY_SD3, **change})
