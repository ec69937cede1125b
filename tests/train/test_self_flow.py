import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from kinema.nn.mmdit import MMDiT, MMDiTParams
from kinema.train import flow
from kinema.train.self_flow import FeatureHead, SelfFlowConfig, self_flow_loss, time_map, token_times

P = MMDiTParams(sample_size=8, pos_embed_max_size=8, depth=3, hidden_size=32, num_heads=4, context_dim=12,
                pooled_dim=10)  # fmt: skip


def _batch(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 8, 8, generator=g)
    noise = torch.randn(b, 4, 8, 8, generator=g)
    t, s = torch.rand(b, generator=g), torch.rand(b, generator=g)
    cond = (torch.randn(b, 5, 12, generator=g), torch.ones(b, 5, dtype=torch.bool), torch.randn(b, 10, generator=g))
    return x0, noise, t, s, cond, g


def test_token_times_put_about_the_mask_ratio_at_s_and_the_rest_at_t():
    g = torch.Generator().manual_seed(0)
    t, s = torch.full((64,), 0.9), torch.full((64,), 0.2)
    tt = token_times(t, s, 256, 0.25, g)
    assert tt.shape == (64, 256)
    assert torch.equal(tt.unique(), torch.tensor([0.2, 0.9]))
    assert (tt == s[0]).float().mean().item() == pytest.approx(0.25, abs=0.01)
    # the same generator state gives the same draw
    assert torch.equal(token_times(t, s, 256, 0.25, torch.Generator().manual_seed(0)), tt)


def test_time_map_spreads_each_token_over_its_patch_in_raster_order():
    tt = torch.arange(6.0).view(1, 6)  # a 2 x 3 grid of tokens
    m = time_map(tt, (2, 3), 2)
    assert m.shape == (1, 1, 4, 6)
    assert m[0, 0, 0:2, 4:6].eq(2).all() and m[0, 0, 2:4, 0:2].eq(3).all()


def test_the_loss_trains_the_student_and_head_but_never_the_teacher(one_thread):
    torch.manual_seed(0)
    model, head = MMDiT(P), FeatureHead(P.hidden_size)
    teacher = copy.deepcopy(model).requires_grad_(False)
    x0, noise, t, s, cond, g = _batch()
    tt = token_times(t, s, 16, 0.5, g)
    loss, parts = self_flow_loss(model, teacher, head, x0, t, s, cond, noise, tt, SelfFlowConfig(student_layer=1))
    loss.backward()
    assert loss.item() == pytest.approx((parts["flow_loss"] + 0.8 * parts["rep_loss"]).item(), rel=1e-5)
    assert not parts["flow_loss"].requires_grad
    assert all(p.grad is not None for p in head.parameters())
    assert model.x_embedder.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_the_flow_part_is_the_velocity_loss_on_the_mixed_noise_input(one_thread):
    torch.manual_seed(0)
    model = MMDiT(P)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0, noise, t, s, cond, g = _batch()
    tt = token_times(t, s, 16, 0.5, g)
    cfg = SelfFlowConfig(weight=0.0, student_layer=1)
    with torch.no_grad():
        loss, parts = self_flow_loss(model, model, FeatureHead(P.hidden_size), x0, t, s, cond, noise, tt, cfg)
        tm = time_map(tt, (4, 4), 2)
        v = model((1 - tm) * x0 + tm * noise, tt, cond[0], cond[2], cond[1])
    assert loss.item() == pytest.approx((v - (noise - x0)).pow(2).mean().item(), rel=1e-5)
    assert parts["rep_loss"] > 0


def test_the_head_learns_to_predict_the_teacher_features(one_thread):
    torch.manual_seed(0)
    model, head = MMDiT(P), FeatureHead(P.hidden_size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = copy.deepcopy(model).requires_grad_(False)
    x0, noise, t, s, cond, g = _batch()
    tt = token_times(t, s, 16, 0.5, g)
    cfg = SelfFlowConfig(student_layer=1, teacher_layer=3)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, parts = self_flow_loss(model, teacher, head, x0, t, s, cond, noise, tt, cfg)
        first = first or parts["rep_loss"].item()
        opt.zero_grad()
        (loss - parts["flow_loss"]).backward()
        opt.step()
    assert parts["rep_loss"].item() < 0.5 * first


@pytest.mark.parametrize(("change", "message"), [
    ({"mask_ratio": 0.0}, "mask_ratio"), ({"mask_ratio": 0.6}, "mask_ratio"), ({"weight": -1.0}, ">= 0"),
    ({"student_layer": 3, "teacher_layer": 3}, "student_layer"), ({"teacher_layer": 5}, "depth"),
])  # fmt: skip
def test_bad_self_flow_settings_raise(change, message):
    with pytest.raises(ValueError, match=message):
        SelfFlowConfig(**change).check(depth=4)


def test_a_self_flow_run_logs_both_losses_resumes_and_exports_a_plain_denoiser(tmp_path, one_thread):
    cfg = flow.FlowTrainConfig(samples=16, batch=4, steps=50, warmup=1, checkpoint_every=1000,
                               self_flow=SelfFlowConfig())  # fmt: skip
    _, ema = flow.train(cfg, tmp_path, flow.Path("models"))
    row = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 50 and row["rep_loss"] > 0 and row["flow_loss"] > 0
    state = load_file(str(tmp_path / "state.safetensors"))
    assert any(k.startswith("model.head.") for k in state) and any(k.startswith("opt.head.") for k in state)
    assert set(ema.state_dict()) == set(MMDiT(ema.params).state_dict())  # no head in what ships
    assert json.loads((tmp_path / "config.json").read_text())["self_flow"]["mask_ratio"] == 0.25
    flow.train(flow.FlowTrainConfig(**{**cfg.__dict__, "steps": 60}), tmp_path, flow.Path("models"))  # resumes
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 60 and rows[-1]["samples"] == 60 * cfg.batch
