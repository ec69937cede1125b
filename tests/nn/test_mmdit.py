import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from kinema.nn import mmdit
from kinema.nn.mmdit import PRESETS, MMDiT, MMDiTParams

TINY = MMDiTParams(
    in_channels=4,
    out_channels=4,
    patch_size=2,
    sample_size=8,
    pos_embed_max_size=8,
    depth=2,
    hidden_size=32,
    num_heads=4,
    context_dim=12,
    pooled_dim=10,
)
VARIANTS = {
    "sd3": TINY,
    "sd3.5": dataclasses.replace(TINY, depth=3, qk_norm=True, dual_attention_layers=(0, 1)),
}


def _inputs(p: MMDiTParams, b: int = 2, h: int = 8, w: int = 8, seq: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p.in_channels, h, w, generator=g)
    t = torch.rand(b, generator=g)
    ctx = torch.randn(b, seq, p.context_dim, generator=g)
    pooled = torch.randn(b, p.pooled_dim, generator=g)
    return x, t, ctx, pooled


def _randomized(p: MMDiTParams) -> MMDiT:
    """A model with the adaLN-zero layers perturbed, so every path reaches the output."""
    torch.manual_seed(0)
    model = MMDiT(p).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("h", "w"), [(8, 8), (8, 4), (4, 6)])
def test_forward_shape_and_dtype(variant, h, w):
    p = VARIANTS[variant]
    x, t, ctx, pooled = _inputs(p, h=h, w=w)
    out = _randomized(p)(x, t, ctx, pooled)
    assert out.shape == (2, p.out_channels, h, w)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_bfloat16_forward_keeps_dtype():
    model = _randomized(TINY).to(torch.bfloat16)
    x, t, ctx, pooled = _inputs(TINY)
    out = model(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_adaln_zero_init_outputs_zero():
    out = MMDiT(TINY)(*_inputs(TINY))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_context_mask_hides_padded_tokens(variant, one_thread):
    p = VARIANTS[variant]
    model = _randomized(p)
    x, t, ctx, pooled = _inputs(p, seq=6)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        ref = model(x, t, ctx, pooled, mask)
        changed_pad = ctx.clone()
        changed_pad[1, 3:] = torch.randn(3, p.context_dim)
        assert torch.allclose(model(x, t, changed_pad, pooled, mask), ref, atol=1e-6)
        changed_real = ctx.clone()
        changed_real[1, 0] += 1.0
        assert not torch.allclose(model(x, t, changed_real, pooled, mask), ref, atol=1e-4)
        # all-True mask is the unmasked network; without a mask the padding does leak in
        assert torch.allclose(model(x, t, ctx, pooled, torch.ones(2, 6, dtype=torch.bool)), model(x, t, ctx, pooled))
        assert not torch.allclose(model(x, t, changed_pad, pooled), model(x, t, ctx, pooled), atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_grad_path_matches_autograd_path(variant, monkeypatch, one_thread):
    # Without autograd the forward runs its MLPs in row chunks over reused buffers and overwrites its own
    # temporaries; it must compute the same function and leave the caller's tensors alone.
    p = VARIANTS[variant]
    model = _randomized(p)
    x, t, ctx, pooled = _inputs(p, seq=6)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    before = [a.clone() for a in (x, t, ctx, pooled)]
    expected = model(x, t, ctx, pooled, mask)
    assert expected.requires_grad
    hidden = int(p.hidden_size * p.mlp_ratio)
    monkeypatch.setattr(mmdit, "_MLP_CHUNK_ELEMENTS", 5 * hidden)  # 5-row chunks: 32 image rows, 12 text
    with torch.no_grad():
        chunked = model(x, t, ctx, pooled, mask)
    monkeypatch.undo()
    with torch.inference_mode():
        whole = model(x, t, ctx, pooled, mask)
    torch.testing.assert_close(chunked, expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(whole, chunked, atol=1e-6, rtol=0)
    for a, b in zip((x, t, ctx, pooled), before, strict=True):
        assert torch.equal(a, b)


def test_no_grad_outputs_are_not_reused_buffers(one_thread):
    model = _randomized(TINY)
    a, b = _inputs(TINY, seed=1), _inputs(TINY, seed=2)
    with torch.no_grad():
        first = model(*a)
        kept = first.clone()
        model(*b)
    assert torch.equal(first, kept)


def test_concurrent_no_grad_forwards_in_threads_agree_with_sequential(one_thread):
    model = _randomized(TINY)
    batches = [_inputs(TINY, seed=s) for s in range(16)]
    with torch.no_grad():
        expected = [model(*inputs) for inputs in batches]

    def run(inputs):
        torch.set_num_threads(1)  # per thread; the same kernels as the sequential run, so the same bits
        with torch.no_grad():
            return model(*inputs)

    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(run, batches))
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_bfloat16_no_grad_forward_tracks_float32(one_thread):
    model = _randomized(TINY)
    x, t, ctx, pooled = _inputs(TINY)
    with torch.no_grad():
        ref = model(x, t, ctx, pooled)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_used_parameter(variant, one_thread):
    p = VARIANTS[variant]
    model = _randomized(p).train()
    model(*_inputs(p)).square().mean().backward()
    no_grad = {n for n, w in model.named_parameters() if w.grad is None or not w.grad.abs().sum()}
    # The last block's text queries are never computed into anything (its text stream ends there).
    assert no_grad <= {f"blocks.{p.depth - 1}.txt_q_norm.weight"}, no_grad


def test_tiny_model_overfits_a_fixed_batch(one_thread):
    torch.manual_seed(0)
    model = MMDiT(TINY)
    x0, _, ctx, pooled = _inputs(TINY, b=4, seed=1)
    eps = torch.randn_like(x0)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps  # rectified flow path (SD3 eq. 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = F.mse_loss(model(xt, t, ctx, pooled), eps - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_heads": 5}, "divisible by num_heads"),
        ({"hidden_size": 30, "num_heads": 3}, "multiple of 4"),
        ({"dual_attention_layers": (2,)}, "outside"),
        ({"sample_size": 7}, "multiple of patch_size"),
        ({"pos_embed_max_size": 2}, "pos_embed_max_size"),
        ({"depth": 0}, "depth"),
    ],
)
def test_params_that_do_not_fit_raise(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **change)


def test_latent_too_large_or_odd_raises():
    model = MMDiT(TINY)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(*_inputs(TINY, h=18, w=8))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(*_inputs(TINY, h=7, w=8))


@pytest.mark.parametrize("name", ["mini", "small"])
def test_small_presets_run(name, one_thread):
    p = PRESETS[name]
    x, t, ctx, pooled = _inputs(p, b=1, h=p.sample_size, w=p.sample_size, seq=3)
    with torch.no_grad():
        assert MMDiT(p)(x, t, ctx, pooled).shape == x.shape


def test_no_grad_after_inference_mode_in_the_same_thread(one_thread):
    """The reused MLP buffers made under inference_mode (as LocalDenoiser samples) must not reach a later no_grad
    forward, which may not write inference tensors (the full suite met this: eval sampled, then these tests ran)."""
    model = _randomized(TINY)
    inputs = _inputs(TINY, seed=3)
    with torch.inference_mode():
        first = model(*inputs).clone()
    with torch.no_grad():
        second = model(*inputs)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def _token_times(p: MMDiTParams, t: torch.Tensor, h: int = 8, w: int = 8, seed: int = 1) -> torch.Tensor:
    """Per-token times (B, N): each sample's t, with about a third of its tokens at another time."""
    g = torch.Generator().manual_seed(seed)
    n = (h // p.patch_size) * (w // p.patch_size)
    other = torch.rand(t.shape[0], generator=g)
    return torch.where(torch.rand(t.shape[0], n, generator=g) < 0.3, other[:, None], t[:, None])


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_token_times_all_equal_are_the_per_sample_time(variant, one_thread):
    model = _randomized(VARIANTS[variant])
    x, t, ctx, pooled = _inputs(model.params)
    with torch.no_grad():
        ref = model(x, t, ctx, pooled)
        per_token = model(x, t[:, None].expand(-1, 16).contiguous(), ctx, pooled)
    torch.testing.assert_close(per_token, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_token_modulations_gathered_by_time_equal_one_row_per_token(variant, monkeypatch, one_thread):
    model = _randomized(VARIANTS[variant])
    x, t, ctx, pooled = _inputs(model.params)
    tt = _token_times(model.params, t)
    with torch.no_grad():
        gathered = model(x, tt, ctx, pooled)

        def one_row_per_token(rows, dim, return_inverse):  # every token conditioned on its own row
            return rows, torch.arange(rows.shape[0])

        monkeypatch.setattr(mmdit.torch, "unique", one_row_per_token)
        direct = model(x, tt, ctx, pooled)
    torch.testing.assert_close(gathered, direct, atol=1e-5, rtol=1e-5)
    # and the second time matters: the same tokens at the per-sample time give another output
    assert (gathered - model(x, t, ctx, pooled).detach()).abs().max() > 1e-3


def test_per_token_times_keep_samples_independent(one_thread):
    model = _randomized(TINY)
    x, t, ctx, pooled = _inputs(TINY, b=3)
    tt = _token_times(TINY, t)
    with torch.no_grad():
        batch = model(x, tt, ctx, pooled)
        alone = model(x[1:2], tt[1:2], ctx[1:2], pooled[1:2])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)


def test_per_token_times_reach_the_time_embedder_gradients(one_thread):
    model = _randomized(TINY).train()
    x, t, ctx, pooled = _inputs(TINY)
    model(x, _token_times(TINY, t), ctx, pooled).square().mean().backward()
    assert model.t_embedder.linear_1.weight.grad.abs().sum() > 0
    assert model.blocks[0].img_mod.weight.grad.abs().sum() > 0


def test_forward_features_are_the_image_stream_after_each_block(one_thread):
    model = _randomized(VARIANTS["sd3.5"])
    x, t, ctx, pooled = _inputs(model.params)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0].clone())) for b in model.blocks]
    with torch.no_grad():
        v, feats = model.forward_features(x, t, ctx, pooled, layers=(1, 3))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(v, model(x, t, ctx, pooled))
    assert len(feats) == 2
    torch.testing.assert_close(feats[0], seen[0])
    torch.testing.assert_close(feats[1], seen[2])


def test_bad_per_token_times_or_feature_layers_raise():
    model = MMDiT(TINY)
    x, t, ctx, pooled = _inputs(TINY)
    with pytest.raises(ValueError, match="per-token times have shape"):
        model(x, torch.rand(2, 15), ctx, pooled)
    with pytest.raises(ValueError, match=r"outside 1\.\.2"):
        model.forward_features(x, t, ctx, pooled, layers=(3,))
