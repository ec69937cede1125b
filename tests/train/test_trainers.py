"""The trainers' data paths and run control: parallel rendering, on-device image pools, time budgets."""

import json

import numpy as np
import pytest
import torch

from kinema.data import World
from kinema.data.world import render_images
from kinema.train import flow
from kinema.train.autoencoder import AETrainConfig, ImagePools
from kinema.train.runtime import add_runtime_args, resolve_device
from kinema.train.state import ema_update


def test_rendering_over_processes_gives_the_same_images_and_captions() -> None:
    world = World()
    one = render_images(world, "train", 9, workers=1)
    two = render_images(world, "train", 9, workers=2)
    assert np.array_equal(one[0], two[0]) and one[1] == two[1]


def test_pools_draw_whole_crops_of_pool_images_and_the_real_share() -> None:
    cfg = AETrainConfig(batch=10, crop=4, real_fraction=0.3, real_pool=5)
    # Every synthetic image is one flat value and a gradient along x, so a crop names its image and offset.
    values = np.arange(6, dtype=np.uint8)[:, None, None, None] * 40
    xs = np.arange(8, dtype=np.uint8)[None, None, :, None]
    synthetic = np.broadcast_to(values + xs, (6, 8, 8, 3)).copy()
    pools = ImagePools(cfg, synthetic, torch.device("cpu"))
    batch = pools.batch(torch.Generator().manual_seed(0))
    assert batch.shape == (10, 3, 4, 4) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    pixels = ((batch + 1) * 127.5).round().to(torch.uint8)
    for crop in pixels[:7]:  # synthetic: constant down columns, +1 along each row, from one image
        assert torch.equal(crop[0], crop[0, :1].expand(4, 4)) and (crop[0, 0, 1:] - crop[0, 0, :-1] == 1).all()
        image, offset = divmod(int(crop[0, 0, 0]), 40)
        assert image < 6 and offset <= 8 - 4
    real = {tuple(r.flatten().tolist()) for r in pools.real.permute(0, 3, 1, 2)}
    assert all(tuple(c.flatten().tolist()) in real for c in pixels[7:])


def test_fused_ema_update_is_the_per_tensor_lerp() -> None:
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    pairs = zip(ema.parameters(), model.parameters(), strict=True)
    expected = [e.detach() + 0.25 * (p.detach() - e.detach()) for e, p in pairs]
    ema_update(ema, model, 0.75)
    assert all(torch.allclose(e, x) for e, x in zip(ema.parameters(), expected, strict=True))


def test_cuda_asked_for_without_one_is_a_clear_error_and_amp_is_ignored_on_a_cpu() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    add_runtime_args(ap)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            resolve_device(ap.parse_args(["--device", "cuda"]))
    args = ap.parse_args(["--device", "cpu", "--amp"])
    assert resolve_device(args).type == "cpu" and args.amp is False


def test_a_flow_run_stops_on_its_time_budget_and_resumes(tmp_path) -> None:
    cfg = flow.FlowTrainConfig(samples=16, batch=4, steps=1000, warmup=1, checkpoint_every=1000)
    flow.train(cfg, tmp_path, flow.Path("models"), max_seconds=1.0)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    done = rows[-1]["step"]
    assert 0 < done < 1000 and rows[-1]["seconds"] < 30
    assert (tmp_path / "state.safetensors").exists()
    flow.train(cfg, tmp_path, flow.Path("models"), max_seconds=0.5)  # resumes from the saved state
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] > done and rows[-1]["samples"] == rows[-1]["step"] * cfg.batch
