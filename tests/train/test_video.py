"""The video trainer on synthetic stand-ins (no rendering, autoencoder or MiniLM): loss, resume, card, metrics."""

import json

import numpy as np
import pytest
import torch

from kinema.nn.checkpoint import save_checkpoint
from kinema.nn.mmdit import MMDiT, MMDiTParams
from kinema.nn.text import TextEmbedding
from kinema.nn.video import VideoMMDiT, load_video_denoiser
from kinema.train import flow
from kinema.train import video as tv

IMAGE = MMDiTParams(depth=2, hidden_size=32, num_heads=2, sample_size=8, pos_embed_max_size=16)
CFG = tv.VideoTrainConfig(preset="test", frames=3, clips=4, images=4, clip_batch=2, image_batch=2, steps=4, warmup=1,
                          checkpoint_every=2, lr=3e-3, image_lr=1e-3)  # fmt: skip


class FakeEncoder:
    """Deterministic per-prompt states in MiniLM's shapes."""

    def encode(self, prompts: list[str]) -> TextEmbedding:
        states = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)) + len(p))
            states.append(torch.randn(4, 384, generator=g))
        tokens = torch.stack(states)
        return TextEmbedding(
            tokens, torch.ones(len(prompts), 4, dtype=torch.bool), tokens.mean(1), [False] * len(prompts)
        )

    def fingerprint(self) -> str:
        return "fake"


def _pool(n: int, frames: int, seed: int) -> tv.ClipPool:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 4, 8, 8, generator=g)
    latents = base + 0.1 * torch.randn(n, frames, 4, 8, 8, generator=g)  # frames of a clip alike
    structure = torch.rand(n, frames, 1, 8, 8, generator=g) * 2 - 1
    return tv.ClipPool(latents, structure, [f"caption {seed} {i}" for i in range(n)])


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    monkeypatch.setattr(flow, "CACHE", tmp_path / "cache")
    monkeypatch.setitem(tv.IMAGE_PRESETS, "test", IMAGE)
    monkeypatch.setattr(
        tv, "load_pools", lambda cfg, models_dir: (_pool(cfg.clips, cfg.frames, 0), _pool(cfg.images, 1, 1), None)
    )
    monkeypatch.setattr("kinema.repository.load_text_encoder_default", FakeEncoder)


def _signal_image_weights(path):
    """A random image MMDiT whose output is not zero (adaLN-zero), saved as an image checkpoint."""
    torch.manual_seed(0)
    image = MMDiT(IMAGE)
    with torch.no_grad():
        for p in image.parameters():
            torch.nn.init.normal_(p, std=0.05)
    save_checkpoint(path, image.state_dict(), image.params)
    return image


def test_loss_falls_on_a_fixed_batch_in_a_few_steps(stand_ins, tmp_path):
    init = tmp_path / "image.safetensors"
    _signal_image_weights(init)
    cfg = tv.VideoTrainConfig(**{**CFG.__dict__, "lr": 1e-2, "image_lr": 1e-2})
    model = tv.build_model(cfg, init, 4)
    opt = tv.make_optimizer(model, cfg)
    pool = _pool(4, 3, 0)
    content = tv.Content(FakeEncoder(), pool.captions, torch.device("cpu"))
    losses = []
    for _ in range(15):
        sse, n = tv.batch_loss(model, pool, content, 0, 4, cfg, torch.Generator().manual_seed(7))  # the same draw
        loss = sse / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_the_network_starts_as_the_image_model_and_freezing_keeps_it(tmp_path):
    init = tmp_path / "image.safetensors"
    image = _signal_image_weights(init)
    model = tv.build_model(CFG, init, 4)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in image.state_dict().items())
    frozen = tv.make_optimizer(model, tv.VideoTrainConfig(image_lr=0.0))
    assert len(frozen.param_groups) == 1
    assert {id(p) for p in frozen.param_groups[0]["params"]} == {id(p) for p in model.new_parameters()}
    assert not model.x_embedder.weight.requires_grad


def test_train_resumes_and_writes_a_card_with_loadable_weights(stand_ins, tmp_path):
    out = tmp_path / "run"
    init = tmp_path / "image.safetensors"
    _signal_image_weights(init)
    tv.train(CFG, out, tmp_path, init)
    state = out / "state.safetensors"
    assert state.exists()
    _, ema = tv.train(tv.VideoTrainConfig(**{**CFG.__dict__, "steps": 6}), out, tmp_path, init)  # resumes at 4
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["clips"] == 6 * CFG.clip_batch
    path = tv.write_card(out, ema, CFG, "python -m kinema.train.video ...", {"note": "test"})
    loaded = load_video_denoiser(path)
    assert loaded.params == ema.params and isinstance(loaded, VideoMMDiT)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.state_dict().items())
    card = (out / "README.md").read_text()
    assert "python -m kinema.train.video" in card and "steps_done | 6" in card


def test_resume_restores_model_optimizer_and_ema_exactly(stand_ins, tmp_path):
    from kinema.train.state import load_train_state, save_train_state

    model = tv.build_model(CFG, None, 4)
    opt = tv.make_optimizer(model, CFG)
    pool = _pool(4, 3, 0)
    content = tv.Content(FakeEncoder(), pool.captions, torch.device("cpu"))
    sse, n = tv.batch_loss(model, pool, content, 0, 2, CFG, torch.Generator().manual_seed(0))
    (sse / n).backward()
    opt.step()
    save_train_state(tmp_path / "s.safetensors", model, opt, {"step": 1}, model)
    again = tv.build_model(CFG, None, 4)
    opt2 = tv.make_optimizer(again, CFG)
    assert load_train_state(tmp_path / "s.safetensors", again, opt2, again) == {"step": 1}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            if p in opt.state:
                assert torch.equal(opt.state[p][key], opt2.state[q][key])


def test_warp_error_is_zero_for_motion_that_matches_the_flow():
    h = w = 16
    xs = torch.arange(w, dtype=torch.float32)
    base = (torch.sin(xs / 2)[None, :] + torch.cos(torch.arange(h) / 3.0)[:, None]) / 4 + 0.5  # (H, W)
    frames = torch.stack([base.roll(shifts=k, dims=1) for k in range(3)])  # content moves 1 px right per frame
    frames = frames[None, :, None].expand(1, 3, 3, h, w).contiguous()
    flow_right = np.zeros((1, 2, h, w, 2), np.float32)
    flow_right[..., 0] = 1.0
    instances = np.zeros((1, 3, h, w), np.uint8)
    good = tv.consistency(frames, flow_right, instances)
    bad = tv.consistency(frames, np.zeros_like(flow_right), instances)
    assert good["warp_error"] < 1e-10 < bad["warp_error"]
    assert good["frame_diff"] == bad["frame_diff"] > 0


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="2 frames"):
        tv.VideoTrainConfig(frames=1)
    with pytest.raises(ValueError, match="probabilities"):
        tv.VideoTrainConfig(reference_prob=1.5)
