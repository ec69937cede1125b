import json

import numpy as np
import pytest
import torch

from kinema.data import WorldParams
from kinema.nn.depth import ssi_loss
from kinema.train.depth import DepthTrainConfig, _render_chunk, depth_metrics, export, to_tensor, train


@pytest.fixture(scope="module")
def pool():
    return _render_chunk((WorldParams(resolution=32), "train", 0, 48))  # 32 px: a fast test


def _fixed_loss(model, pool) -> float:
    from kinema.nn.depth import normalise_disparity

    x = to_tensor(pool["rgb"][:16])
    d = normalise_disparity(torch.from_numpy(1.0 / pool["depth"][:16])[:, None])
    with torch.no_grad():
        return ssi_loss(model(x), d)[0].item()


def test_tiny_training_run_improves_and_resumes(pool, tmp_path):
    cfg = DepthTrainConfig(preset="tiny", steps=60, batch=8, lr=3e-3, texture_prob=0.0, checkpoint_every=30)
    torch.manual_seed(0)
    from kinema.nn.depth import PRESETS, DepthNet

    before = _fixed_loss(DepthNet(PRESETS["tiny"]), pool)  # the same initialisation train() draws (seed 0)
    half = train(DepthTrainConfig(**{**cfg.__dict__, "steps": 30}), tmp_path, pool=pool, log_every=10)
    assert _fixed_loss(half, pool) < before
    model = train(cfg, tmp_path, pool=pool, log_every=10)  # resumes at step 30
    after = _fixed_loss(model, pool)
    assert after < 0.6 * before, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "ssi" in r] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["step"] == 60


def test_metrics_are_perfect_for_exact_disparity_and_ignore_scale_and_shift():
    depth = torch.rand(3, 1, 8, 8) * 5 + 2
    m = depth_metrics(3.0 / depth + 0.7, depth)
    assert m["absrel"] < 1e-5 and m["delta1"] == 1.0 and m["positive_scale"] == 1.0
    worse = depth_metrics(torch.rand(3, 1, 8, 8), depth)
    assert worse["absrel"] > 0.05 and worse["delta1"] < 1.0


def test_export_writes_loadable_weights_with_the_card(tmp_path):
    from kinema.inference.networks import load_network
    from kinema.nn.checkpoint import read_metadata
    from kinema.nn.depth import PRESETS, DepthNet

    model = DepthNet(PRESETS["tiny"]).eval()
    path = export(model, tmp_path, {"note": "test"})
    assert path == tmp_path / "depth/1/depth.safetensors"
    assert read_metadata(path)["card"] == {"note": "test"}
    network = load_network("depth", path.parent, {})
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 30, 50)).astype(np.float32)
    out = network({"IMAGE": images})["DEPTH"]
    assert out.shape == (2, 1, 30, 50) and out.dtype == np.float32


def test_kinema_eval_depth_writes_results(tmp_path):
    from kinema.cli import main
    from kinema.eval.report import read_results
    from kinema.nn.depth import PRESETS, DepthNet

    path = export(DepthNet(PRESETS["tiny"]).eval(), tmp_path / "models", {"note": "test"})
    out = tmp_path / "depth"
    assert main(["eval", "depth", "--weights", str(path), "--n", "4", "--out", str(out)]) == 0
    r = read_results(out)["results"]
    assert r["synthetic_test"]["n"] == 4 and 0 < r["synthetic_test"]["absrel"] < 10
    assert -1 <= r["motorcycle"]["spearman_aspect_kept"] <= 1 and r["motorcycle"]["valid_pixels"] > 300_000
    assert out.with_suffix(".md").read_text().startswith("# depth")
