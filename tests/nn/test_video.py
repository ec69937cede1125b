import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from kinema.nn.checkpoint import params_from_metadata, save_checkpoint
from kinema.nn.mmdit import MMDiT, MMDiTParams
from kinema.nn.video import (
    PRESETS,
    VideoMMDiT,
    VideoMMDiTParams,
    branch_predictor,
    degrade_structure,
    disparity,
    frame_embedding,
    load_video_denoiser,
    structure_input,
)
from kinema.repository import DENOISER_FILE, default_models_dir

TINY = VideoMMDiTParams(depth=2, hidden_size=32, num_heads=2, sample_size=8, pos_embed_max_size=16, max_frames=8)


def _inputs(b: int, f: int, p: MMDiTParams, seed: int = 0, side: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, p.in_channels, side, side, generator=g)
    t = torch.rand(b, generator=g)
    ctx = torch.randn(b, 5, p.context_dim, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2] * b)[:b]
    pooled = torch.randn(b, p.pooled_dim, generator=g)
    structure = torch.rand(b, f, 1, side, side, generator=g) * 2 - 1
    level = torch.rand(b, generator=g)
    return x, t, ctx, pooled, mask, structure, level


def _perturb_video_parts(model: VideoMMDiT, std: float = 0.05) -> None:
    """Give the zero-initialised video parts a signal (as training would)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.new_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _trained_like(params: VideoMMDiTParams = TINY) -> VideoMMDiT:
    """A random network whose image part gives a signal (adaLN-zero starts at zero output), video parts at init."""
    torch.manual_seed(0)
    model = VideoMMDiT(params).eval()
    new = {id(p) for p in model.new_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in new:
                torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture(scope="module")
def shipped():
    path = default_models_dir() / DENOISER_FILE
    if not path.is_file():
        pytest.skip(f"no shipped denoiser at {path}")
    image = MMDiT(params_from_metadata(path, MMDiTParams))
    state = load_file(str(path))
    image.load_state_dict(state)
    video = VideoMMDiT(VideoMMDiTParams.from_image(image.params))
    video.load_image_weights(state)
    return image.eval(), video.eval()


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("temporal", [True, False])
def test_at_initialisation_the_video_model_is_the_shipped_image_model(shipped, frames, temporal):
    image, video = shipped
    p = image.params
    x, t, ctx, pooled, mask, structure, level = _inputs(2, frames, p, side=16)
    # The image model over the clip's frames as one batch of B*F images: the same matrix sizes, so any
    # difference would be the video parts' doing, not the BLAS kernel a batch size picks.
    per_frame = lambda v: v.repeat_interleave(frames, dim=0)
    with torch.no_grad():
        expected = image(x.flatten(0, 1), per_frame(t), per_frame(ctx), per_frame(pooled), per_frame(mask))
        expected = expected.unflatten(0, (2, frames))
        plain = video(x, t, ctx, pooled, mask, temporal=temporal)
        conditioned = video(x, t, ctx, pooled, mask, structure=structure, structure_level=level, temporal=temporal)
    assert plain.shape == x.shape
    assert (plain - expected).abs().max() <= 1e-6
    assert (conditioned - expected).abs().max() <= 1e-6
    assert torch.equal(plain, expected) and torch.equal(conditioned, expected)  # in fact bit for bit


def test_temporal_layers_mix_frames_only_when_on():
    model = _trained_like()
    _perturb_video_parts(model)
    x, t, ctx, pooled, mask, structure, level = _inputs(2, 4, TINY)
    x2 = x.clone()
    x2[:, 3] += 1.0  # change the last frame only
    with torch.no_grad():
        on = [model(v, t, ctx, pooled, mask, structure=structure, structure_level=level) for v in (x, x2)]
        off = [
            model(v, t, ctx, pooled, mask, structure=structure, structure_level=level, temporal=False) for v in (x, x2)
        ]
    assert (on[0][:, :3] - on[1][:, :3]).abs().max() > 1e-4  # the other frames see it through time
    assert torch.equal(off[0][:, :3], off[1][:, :3])  # frame-wise: every frame on its own
    # Frame-wise is the same network applied to each frame as a 1-frame clip.
    with torch.no_grad():
        single = torch.cat([model(x[:, i : i + 1], t, ctx, pooled, mask, structure=structure[:, i : i + 1],
                                  structure_level=level) for i in range(4)], dim=1)  # fmt: skip
    torch.testing.assert_close(off[0], single, atol=1e-6, rtol=0)


def test_structure_and_its_level_change_the_prediction_once_trained():
    model = _trained_like()
    x, t, ctx, pooled, mask, structure, level = _inputs(2, 2, TINY)
    with torch.no_grad():
        base = model(x, t, ctx, pooled, mask, structure=structure, structure_level=level)
        _perturb_video_parts(model)
        moved = model(x, t, ctx, pooled, mask, structure=structure, structure_level=level)
        other_structure = model(x, t, ctx, pooled, mask, structure=-structure, structure_level=level)
        other_level = model(x, t, ctx, pooled, mask, structure=structure, structure_level=1 - level)
    assert (moved - base).abs().max() > 1e-4
    assert (other_structure - moved).abs().max() > 1e-4
    assert (other_level - moved).abs().max() > 1e-4


def test_every_new_part_learns_from_its_zero_initialisation():
    model = _trained_like().train()  # the image part as if trained: adaLN-zero would block every gradient
    x, t, _, _, _, structure, level = _inputs(2, 3, TINY)
    tokens, ref_mask, ref_pooled = model.reference(x[:, 0])
    out = model(x, t, tokens, ref_pooled, ref_mask, structure=structure, structure_level=level)
    out.pow(2).mean().backward()
    names = ["structure_embedder.weight", "ts_embedder.linear_2.weight", "temporal_blocks.0.mod.weight",
             "temporal_blocks.1.mod.weight", "reference.tokens.2.weight", "reference.pooled.2.weight"]  # fmt: skip
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n in names:
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    # The temporal projections see no gradient until a gate opens (adaLN-zero), like DiT's blocks.
    assert grads["temporal_blocks.0.proj.weight"].abs().sum() == 0


def test_new_parameters_are_exactly_what_the_image_model_lacks():
    model = VideoMMDiT(TINY)
    image_keys = set(MMDiT(TINY.image_params()).state_dict())
    new = {id(p) for p in model.new_parameters()}
    for name, p in model.named_parameters():
        assert (id(p) in new) == (name not in image_keys), name
    assert model.params.temporal_after == (0, 1)
    assert dataclasses.replace(TINY, temporal_every=2).temporal_after == (1,)


def test_load_image_weights_rejects_other_networks():
    model = VideoMMDiT(TINY)
    state = MMDiT(TINY.image_params()).state_dict()
    model.load_image_weights(state)
    with pytest.raises(ValueError, match=r"unexpected \[.bogus.\]"):
        model.load_image_weights(state | {"bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing \[.final_proj.weight.\]"):
        model.load_image_weights({k: v for k, v in state.items() if k != "final_proj.weight"})


def test_reference_content_fills_the_text_slots():
    model = VideoMMDiT(TINY)
    latent = torch.randn(3, TINY.in_channels, 8, 8)
    tokens, mask, pooled = model.reference(latent)
    assert tokens.shape == (3, TINY.reference_grid**2, TINY.context_dim)
    assert mask.dtype == torch.bool and mask.all() and pooled.shape == (3, TINY.pooled_dim)


def test_shapes_limits_and_errors():
    model = VideoMMDiT(TINY).eval()
    x, t, ctx, pooled, mask, structure, _ = _inputs(1, 2, TINY)
    with pytest.raises(ValueError, match="does not fit"):
        model(x, t, ctx, pooled, mask, structure=structure[:, :1])
    with pytest.raises(ValueError, match="max_frames"):
        model(torch.zeros(1, 9, 4, 8, 8), t, ctx, pooled, mask)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.zeros(1, 2, 4, 7, 8), t, ctx, pooled, mask)
    with pytest.raises(ValueError, match="temporal_every"):
        VideoMMDiTParams(depth=2, temporal_every=3)
    with pytest.raises(ValueError, match="max_frames"):
        frame_embedding(9, 8, max_frames=8)
    assert PRESETS["tiny"].image_params() == MMDiTParams(depth=4, hidden_size=192, num_heads=3)


def test_frame_embedding_differs_between_neighbours():
    e = frame_embedding(8, 64, max_frames=64)
    assert e.shape == (8, 64)
    assert ((e[1:] - e[:-1]).norm(dim=1) > 0.1).all()


def test_structure_input_is_invariant_to_scale_and_shift_of_disparity():
    g = torch.Generator().manual_seed(0)
    depth = 1 + 9 * torch.rand(2, 3, 16, 16, generator=g)
    s = structure_input(disparity(depth), (8, 8))
    assert s.shape == (2, 3, 1, 8, 8) and s.min() >= -1 and s.max() <= 1
    torch.testing.assert_close(structure_input(3.5 * disparity(depth) + 2.0, (8, 8)), s, atol=1e-5, rtol=0)


def test_degrade_structure_keeps_level_zero_and_removes_more_detail_as_it_grows():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(4, 2, 1, 16, 16, generator=g) * 2 - 1
    levels = torch.tensor([0.0, 0.3, 0.6, 1.0])
    out = degrade_structure(s, levels)
    assert out.shape == s.shape and torch.equal(out[0], s[0])
    # Same input for every level: the error against it and the loss of fine detail grow with t_s.
    same = s[:1].expand(4, -1, -1, -1, -1)
    out = degrade_structure(same, levels)
    err = (out - same).pow(2).mean(dim=(1, 2, 3, 4))
    detail = (out[..., 1:, :] - out[..., :-1, :]).abs().mean(dim=(1, 2, 3, 4))
    assert (err.diff() > 0).all() and (detail.diff() < 0).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade_structure(s, torch.tensor([0.0, 0.3, 0.6, 1.5]))
    with pytest.raises(ValueError, match="level must be"):
        degrade_structure(s, torch.tensor([0.5]))


def test_branch_predictor_batches_like_separate_calls():
    model = _trained_like()
    _perturb_video_parts(model)
    x, t, ctx, pooled, mask, structure, level = _inputs(2, 3, TINY)
    null = (torch.randn(1, 2, TINY.context_dim), torch.ones(1, 2, dtype=torch.bool), torch.randn(1, TINY.pooled_dim))
    predict = branch_predictor(model, (ctx, mask, pooled), null, structure, level)

    class B:  # any object with the two flags is a branch
        def __init__(self, conditional, temporal):
            self.conditional, self.temporal = conditional, temporal

    with torch.no_grad():
        uf, cf, cv = predict(x, t, [B(False, False), B(True, False), B(True, True)])
        null_ctx = torch.nn.functional.pad(null[0], (0, 0, 0, 3)).expand(2, -1, -1)
        null_mask = torch.nn.functional.pad(null[1], (0, 3)).expand(2, -1)
        kw = {"structure": structure, "structure_level": level}
        ref_uf = model(x, t, null_ctx, null[2].expand(2, -1), null_mask, temporal=False, **kw)
        ref_cf = model(x, t, ctx, pooled, mask, temporal=False, **kw)
        ref_cv = model(x, t, ctx, pooled, mask, **kw)
    for got, ref in ((uf, ref_uf), (cf, ref_cf), (cv, ref_cv)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (cv - cf).abs().max() > 1e-4


def test_checkpoint_round_trip(tmp_path):
    model = _trained_like()
    _perturb_video_parts(model)
    path = tmp_path / "video.safetensors"
    save_checkpoint(path, model.state_dict(), model.params)
    loaded = load_video_denoiser(path)
    assert loaded.params == TINY
    x, t, ctx, pooled, mask, structure, level = _inputs(2, 3, TINY)
    with torch.no_grad():
        a = model(x, t, ctx, pooled, mask, structure=structure, structure_level=level)
        b = loaded(x, t, ctx, pooled, mask, structure=structure, structure_level=level)
    assert torch.equal(a, b)
