"""IIN training on a tiny stand-in data set: pairs, the factor loss, likelihood, checkpoints, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kinema.train.iin import (
    FACTORS,
    FactorData,
    IINTrainConfig,
    PairSampler,
    estimate_factor_dims,
    export,
    factor_labels,
    factor_pair_nll,
    load_iin,
    round_to_half,
    set_prototypes,
    train,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny flows: one thread is ~30x faster than two spin-waiting on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fake_data(n: int = 384, seed: int = 0) -> FactorData:
    """Latents (2, 4, 4) where colour, shape, size and u each move their own random directions."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.randint(0, 6, (n,), generator=g)
    shape = torch.randint(0, 3, (n,), generator=g)
    size = torch.randint(0, 2, (n,), generator=g)
    u = torch.rand(n, generator=g) * 0.7 + 0.15
    dirs = torch.randn(4, 32, generator=g)
    codes = torch.randn(6, 32, generator=g)
    flat = codes[colour] + shape[:, None] * dirs[0] + size[:, None] * dirs[1] + 4 * u[:, None] * dirs[2]
    flat = flat + 0.3 * torch.randn(n, 32, generator=g)
    captions = [f"a {c} {s}" for c, s in zip(colour.tolist(), shape.tolist(), strict=True)]
    images = torch.zeros(n, 8, 8, 3, dtype=torch.uint8)
    return FactorData(images, flat.view(n, 2, 4, 4), colour, shape, size, u, captions)


def _cfg(**kw) -> IINTrainConfig:
    base = {"kind": "factor", "components": 16, "blocks": 3, "hidden": 32, "batch": 64, "steps": 300,
            "warmup": 10, "lr": 3e-3, "checkpoint_every": 40}  # fmt: skip
    return IINTrainConfig(**(base | kw))


def test_pair_sampler_pairs_share_the_factor() -> None:
    data = _fake_data()
    sampler = PairSampler(data)
    a, b, which = sampler.sample(512, torch.Generator().manual_seed(0))
    labels = {"colour": data.colour, "shape": data.shape, "size": data.size}
    for k, name in enumerate(FACTORS):
        sel = which == k
        assert sel.any()
        if name == "position":
            assert (data.u[a[sel]] - data.u[b[sel]]).abs().max() < 0.1
        else:
            assert torch.equal(labels[name][a[sel]], labels[name][b[sel]])
    a, b, which = sampler.sample(64, torch.Generator().manual_seed(1), only="shape")
    assert (which == FACTORS.index("shape")).all() and torch.equal(data.shape[a], data.shape[b])


def test_factor_pair_nll_is_the_bivariate_normal() -> None:
    rho = 0.8
    z_a, z_b = torch.randn(5, 3), torch.randn(5, 3)
    shared = torch.tensor([[True, False, False]] * 5)
    got = factor_pair_nll(z_a, z_b, torch.zeros(5), torch.zeros(5), shared, rho) * 6
    mvn = torch.distributions.MultivariateNormal(torch.zeros(2), torch.tensor([[1.0, rho], [rho, 1.0]]))
    normal = torch.distributions.Normal(0.0, 1.0)
    want = -mvn.log_prob(torch.stack([z_a[:, 0], z_b[:, 0]], -1))
    want = want - normal.log_prob(z_a[:, 1:]).sum(1) - normal.log_prob(z_b[:, 1:]).sum(1)
    assert got.tolist() == pytest.approx(want.tolist(), abs=1e-4)
    none = factor_pair_nll(z_a, z_b, torch.ones(5), torch.ones(5), torch.zeros(5, 3, dtype=torch.bool), rho)
    indep = (0.5 * (z_a.pow(2) + z_b.pow(2)).sum(1) + 3 * math.log(2 * math.pi) - 2) / 6
    assert none.tolist() == pytest.approx(indep.tolist(), abs=1e-5)


def test_dimension_estimate_follows_the_shared_signal() -> None:
    data = _fake_data(2000)
    x = data.latents.flatten(1)
    x = (x - x.mean(0)) / x.std(0)
    scores, dims = estimate_factor_dims(x, PairSampler(data), pairs=4000)
    assert set(dims) == set(FACTORS) and all(d >= 1 for d in dims.values())
    assert scores["colour"] > scores["size"]  # six random codes move x more than a two-valued size
    assert sum(dims.values()) < x.shape[1]  # the residual keeps the rest


def test_factor_training_improves_likelihood_and_factor_loss_then_exports(tmp_path) -> None:
    data = _fake_data()
    cfg = _cfg()
    model, edges, estimate, _ = train(cfg, tmp_path / "run", tmp_path, data=data)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and log[-1]["step"] == cfg.steps
    first, last = log[0], log[-1]
    assert last["nll"] < first["nll"] - 0.2  # the likelihood improves
    assert last["pair_nll"] < first["pair_nll"] - 0.2  # and the factor loss falls
    assert estimate is not None and model.params.factor_names == FACTORS
    set_prototypes(model, data, edges)
    labels = factor_labels(data, edges)
    z = model.factorize(data.latents)[0]["colour"]
    # Same-colour renders lie closer in z_colour than different-colour ones once trained.
    same = labels["colour"][:, None] == labels["colour"][None]
    dist = torch.cdist(z, z)
    assert dist[same].mean() < dist[~same].mean()
    path = export(model, cfg, tmp_path / "models" / "iin_factor", {"seed": 0}, "python -m kinema.train.iin")
    assert (tmp_path / "models" / "iin_factor" / "README.md").exists()
    loaded = load_iin(path)
    a, b = model.factorize(data.latents[:8]), loaded.factorize(data.latents[:8])
    assert torch.equal(a[1], b[1]) and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert torch.equal(loaded.proto_colour, model.proto_colour)
    edited = loaded.edit(data.latents[:4], {"colour": "red"})
    assert edited.shape == (4, 2, 4, 4)
    # Shipped at half size: the file holds float16, the loaded flow runs (and inverts) in float32.
    round_to_half(model)
    half = export(model, cfg, tmp_path / "models" / "half", {}, "python -m kinema.train.iin", dtype="float16")
    assert half.stat().st_size < 0.6 * path.stat().st_size
    loaded = load_iin(half)
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.equal(loaded.encode(data.latents[:8])[0], model.encode(data.latents[:8])[0])
    z, _, rest = loaded.encode(data.latents[:8])
    assert (loaded.decode(z, rest) - data.latents[:8]).abs().max() < 1e-4


def test_training_resumes_from_its_checkpoint(tmp_path) -> None:
    data = _fake_data()
    run = tmp_path / "run"
    train(_cfg(kind="mle", steps=40), run, tmp_path, data=data)
    model, *_ = train(_cfg(kind="mle", steps=80), run, tmp_path, data=data)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 80 and steps.count(50) == 1
    again, *_ = train(_cfg(kind="mle", steps=80), run, tmp_path, data=data)  # nothing left to do
    assert torch.equal(again.encode(data.latents[:4])[0], model.encode(data.latents[:4])[0])


def test_conditional_training_inverts_given_the_condition(tmp_path) -> None:
    data = _fake_data()
    cond = torch.nn.functional.one_hot(data.colour, 6).float() + 0.01 * torch.randn(len(data), 6)
    model, *_ = train(_cfg(kind="net2net", steps=120), tmp_path / "run", tmp_path, data=data, cond=cond)
    assert model.params.cond_dim == 6
    z, _, rest = model.encode(data.latents[:16], cond[:16])
    assert (model.decode(z, rest, cond[:16]) - data.latents[:16]).abs().max() < 1e-4
    # Samples given a colour's condition land nearer that colour's training latents than others'.
    red = cond[data.colour == 0][:1].expand(64, -1)
    samples = model.sample(red, generator=torch.Generator().manual_seed(0)).flatten(1)
    means = torch.stack([data.latents[data.colour == c].flatten(1).mean(0) for c in range(6)])
    assert torch.cdist(samples.mean(0, keepdim=True), means).argmin() == 0


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="kind"):
        IINTrainConfig(kind="vae")
    with pytest.raises(ValueError, match="factor_dims"):
        IINTrainConfig(factor_dims=(1, 2))
    with pytest.raises(ValueError, match="rho"):
        IINTrainConfig(rho=1.0)
