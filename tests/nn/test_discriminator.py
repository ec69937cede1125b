"""LADD's discriminator: frozen teacher features, trainable heads, per-token logits."""

import pytest
import torch

from kinema.nn.discriminator import DiscriminatorParams, LatentDiscriminator, TeacherFeatures
from kinema.nn.mmdit import MMDiT, MMDiTParams

TEACHER = MMDiTParams(depth=3, hidden_size=32, num_heads=2, sample_size=8, pos_embed_max_size=8, context_dim=16,
                      pooled_dim=12)  # fmt: skip


def _teacher() -> MMDiT:
    torch.manual_seed(0)
    teacher = MMDiT(TEACHER)
    for p in teacher.parameters():  # adaLN-zero starts every block as the identity; give it a signal
        torch.nn.init.normal_(p, std=0.05)
    return teacher


def _inputs(b: int = 2, side: int = 8, length: int = 5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, side, side, generator=g)
    t = torch.rand(b, generator=g)
    ctx = torch.randn(b, length, TEACHER.context_dim, generator=g)
    pooled = torch.randn(b, TEACHER.pooled_dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, -2:] = False
    return x, t, ctx, pooled, mask


@pytest.mark.parametrize("blocks", [(0,), (0, 2), (0, 1, 2)])
@pytest.mark.parametrize("side", [8, 4])
def test_logits_are_one_per_token_per_head(blocks, side):
    teacher = _teacher()
    d = LatentDiscriminator(teacher, DiscriminatorParams.for_teacher(TEACHER, feature_blocks=blocks, head_width=16))
    x, t, ctx, pooled, mask = _inputs(side=side)
    n_tokens = (side // TEACHER.patch_size) ** 2
    assert d(x, t, ctx, pooled, mask).shape == (2, len(blocks) * n_tokens)


def test_features_are_the_chosen_blocks_outputs_with_or_without_autograd():
    teacher = _teacher()
    x, t, ctx, pooled, mask = _inputs()
    seen = []
    handle = teacher.blocks[1].register_forward_hook(lambda m, a, out: seen.append(out[0].detach().clone()))
    features = TeacherFeatures(teacher, (1, 2))
    with torch.no_grad():  # the CPU fast path computes in place without autograd: features must not be overwritten
        fast = features(x, t, ctx, pooled, mask)
    slow = features(x, t, ctx, pooled, mask)
    handle.remove()
    assert [f.shape for f in fast] == [(2, 16, 32), (2, 16, 32)]
    torch.testing.assert_close(fast[0], seen[0])
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fast[0], fast[1])


def test_teacher_is_frozen_heads_train_and_gradients_reach_the_input():
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = LatentDiscriminator(teacher, DiscriminatorParams.for_teacher(TEACHER, head_width=16)).train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x, t, ctx, pooled, mask = _inputs()
    x.requires_grad_(True)
    d(x, t, ctx, pooled, mask).mean().backward()
    assert all(p.grad is None for p in teacher.parameters())
    heads = list(d.heads.named_parameters())
    assert heads and all(p.grad is not None for _, p in heads)
    # The output projections see the features even at initialisation (adaLN modulation starts at zero).
    assert all(p.grad.abs().sum() > 0 for n, p in heads if not n.endswith(("modulation.weight", "modulation.bias")))
    assert x.grad is not None and x.grad.abs().sum() > 0  # the student's signal goes through the frozen teacher

    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_logits_depend_on_noise_level_and_text():
    teacher = _teacher()
    d = LatentDiscriminator(teacher, DiscriminatorParams.for_teacher(TEACHER, head_width=16))
    for p in d.heads.parameters():  # move the zero-initialised modulations off zero
        torch.nn.init.normal_(p, std=0.1)
    x, t, ctx, pooled, mask = _inputs()
    base = d(x, t, ctx, pooled, mask)
    assert not torch.allclose(base, d(x, t.flip(0), ctx, pooled, mask))
    assert not torch.allclose(base, d(x, t, ctx, pooled.flip(0), mask))


def test_bad_params_are_clear_errors():
    with pytest.raises(ValueError, match="distinct"):
        DiscriminatorParams(feature_blocks=(1, 1))
    with pytest.raises(ValueError, match="odd"):
        DiscriminatorParams(kernel_size=2)
    with pytest.raises(ValueError, match="outside"):
        LatentDiscriminator(_teacher(), DiscriminatorParams.for_teacher(TEACHER, feature_blocks=(0, 5)))
    with pytest.raises(ValueError, match="do not match"):
        LatentDiscriminator(_teacher(), DiscriminatorParams(feature_blocks=(0,)))
