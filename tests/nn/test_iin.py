"""Invertible blocks and flows: exact inverses, log-determinants against the brute-force Jacobian."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kinema.nn.checkpoint import save_checkpoint
from kinema.nn.iin import (
    ActNorm,
    AffineCoupling,
    FactorLayout,
    Flow,
    FlowParams,
    InterpretationNet,
    InterpretationParams,
    LatentBasis,
    LUMixing,
    Permutation,
    standard_normal_nll,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny flows: one thread is ~30x faster than two spin-waiting on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Random weights, so the identity init of couplings does not hide mistakes.

    The LU factors already start as a random rotation; noise on them would make a deep stack's
    mixing arbitrarily ill-conditioned, which no trained flow is.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.endswith(".lu") and name != "lu":
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def _flow(dim: int = 6, cond: int = 0, mixing: str = "lu") -> Flow:
    return _randomise(Flow(FlowParams(dim=dim, blocks=3, hidden=16, depth=2, mixing=mixing, cond_dim=cond)), 0.1)


BLOCKS = {
    "actnorm": lambda d: ActNorm(d),
    "permute": lambda d: Permutation(d, torch.Generator().manual_seed(0)),
    "lu": lambda d: LUMixing(d, torch.Generator().manual_seed(0)),
    "coupling": lambda d: AffineCoupling(d, 16, 2, 2.0),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("dim", [5, 8])
def test_block_inverts_and_logdet_is_the_jacobian(name: str, dim: int) -> None:
    block = _randomise(BLOCKS[name](dim))
    x = torch.randn(4, dim, generator=torch.Generator().manual_seed(2))
    z, logdet = block(x)
    assert z.shape == x.shape and logdet.shape == (4,)
    assert (block.inverse(z) - x).abs().max() < 1e-5
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: block(v[None])[0][0], x[i])  # (D, D)
        assert logdet[i].item() == pytest.approx(torch.linalg.slogdet(jac).logabsdet.item(), abs=1e-4)


@pytest.mark.parametrize("mixing", ["lu", "permute"])
def test_flow_invertibility_error_below_1e_4(mixing: str) -> None:
    flow = _randomise(Flow(FlowParams(dim=64, blocks=8, hidden=64, mixing=mixing)), scale=0.02)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(3)) * 2
    z, _ = flow(x)
    assert torch.isfinite(z).all()
    assert (flow.inverse(z) - x).abs().max().item() <= 1e-4
    zz = torch.randn(256, 64, generator=torch.Generator().manual_seed(4))
    assert (flow(flow.inverse(zz))[0] - zz).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cond", [0, 3])
def test_flow_logdet_equals_brute_force_jacobian(cond: int) -> None:
    flow = _flow(dim=6, cond=cond)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    c = torch.randn(3, cond) if cond else None
    _, logdet = flow(x, c)
    for i in range(3):
        ci = None if c is None else c[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda v, ci=ci: flow(v[None], ci)[0][0], x[i])
        assert logdet[i].item() == pytest.approx(torch.linalg.slogdet(jac).logabsdet.item(), abs=1e-4)


def test_conditional_flow_inverts_given_the_condition_and_depends_on_it() -> None:
    flow = _flow(dim=8, cond=5)
    x = torch.randn(16, 8)
    c = torch.randn(16, 5)
    z, _ = flow(x, c)
    assert (flow.inverse(z, c) - x).abs().max() < 1e-5
    assert (flow.inverse(z, torch.randn(16, 5)) - x).abs().max() > 1e-2  # the condition matters
    with pytest.raises(ValueError, match="condition"):
        flow(x)
    with pytest.raises(ValueError, match="condition"):
        _flow(dim=8)(x, c)
    with pytest.raises(ValueError, match=r"\(16, 5\)"):
        flow(x, torch.randn(16, 4))


def test_actnorm_data_dependent_init_whitens_the_first_batch() -> None:
    norm = ActNorm(4).train()
    x = torch.randn(512, 4) * torch.tensor([1.0, 2.0, 3.0, 0.5]) + 7
    z, _ = norm(x)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0) - 1).abs().max() < 1e-3
    before = norm.bias.clone()
    norm(x * 2)  # initialised once only
    assert torch.equal(before, norm.bias)


def test_bad_params_raise() -> None:
    with pytest.raises(ValueError, match="mixing"):
        FlowParams(mixing="shuffle")
    with pytest.raises(ValueError, match="dim"):
        FlowParams(dim=1)
    with pytest.raises(ValueError, match="fit"):
        FactorLayout(("a",), (9,), 8)


def test_layout_and_nll() -> None:
    layout = FactorLayout(("colour", "shape"), (3, 2), 10)
    assert layout.residual == 5 and layout.slice("shape") == slice(8, 10)
    with pytest.raises(KeyError, match="size"):
        layout.slice("size")
    z = torch.zeros(2, 4)
    assert standard_normal_nll(z, torch.zeros(2)).tolist() == pytest.approx([0.9189385] * 2)


def _net(cond: int = 0) -> InterpretationNet:
    params = InterpretationParams(
        latent_shape=(2, 4, 4),
        components=8,
        blocks=2,
        hidden=16,
        cond_dim=cond,
        factor_names=("colour", "shape"),
        factor_dims=(2, 2),
        factor_values=(("red", "blue"), ("cube", "cone", "sphere")),
    )
    net = InterpretationNet(params)
    latents = torch.randn(64, 2, 4, 4)
    net.basis.fit(latents)
    return _randomise(net, scale=0.1)


def test_basis_projection_is_exact_with_the_rest() -> None:
    basis = LatentBasis((2, 4, 4), 5)
    latents = torch.randn(100, 2, 4, 4)
    explained = basis.fit(latents)
    assert explained.shape == (5,) and (explained[:-1] >= explained[1:]).all()
    x, rest = basis.project(latents)
    assert (x.std(0) - 1).abs().max() < 1e-3  # whitened
    assert (basis.reconstruct(x, rest) - latents).abs().max() < 1e-5


def test_interpretation_net_factorize_edit_and_checkpoint(tmp_path) -> None:
    net = _net()
    with torch.no_grad():
        net.proto_colour.copy_(torch.tensor([[2.0, 0.0], [-2.0, 0.0]]))
    latents = torch.randn(4, 2, 4, 4)
    factors, residual = net.factorize(latents)
    assert factors["colour"].shape == (4, 2) and residual.shape == (4, 4)
    edited = net.edit(latents, {"colour": "blue"})
    assert (net.factorize(edited)[0]["colour"] - torch.tensor([-2.0, 0.0])).abs().max() < 1e-4
    assert (net.factorize(edited)[0]["shape"] - factors["shape"]).abs().max() < 1e-4
    shifted = net.edit(latents, {"shape": torch.ones(2)}, mode="shift")
    assert (net.factorize(shifted)[0]["shape"] - factors["shape"] - 1).abs().max() < 1e-4
    assert (net.edit(latents, {}) - latents).abs().max() < 1e-4  # no edit, the same latents
    assert net.scores(latents)["colour"].sum(-1).tolist() == pytest.approx([1.0] * 4)
    with pytest.raises(KeyError, match="green"):
        net.edit(latents, {"colour": "green"})
    with pytest.raises(KeyError, match="size"):
        net.edit(latents, {"size": "large"})
    path = tmp_path / "iin.safetensors"
    save_checkpoint(path, net.state_dict(), net.params)
    loaded = InterpretationNet(net.params)
    loaded.load_state_dict(load_file(str(path)))
    loaded.eval()
    assert torch.equal(loaded.factorize(latents)[1], residual)


def test_conditional_interpretation_net_samples_given_the_condition() -> None:
    net = _net(cond=3)
    latents = torch.randn(4, 2, 4, 4)
    cond = torch.randn(4, 3)
    z, _, rest = net.encode(latents, cond)
    assert (net.decode(z, rest, cond) - latents).abs().max() < 1e-4
    samples = net.sample(cond, generator=torch.Generator().manual_seed(0))
    assert samples.shape == latents.shape and torch.isfinite(samples).all()
