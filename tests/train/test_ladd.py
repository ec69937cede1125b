"""LADD trainer: student times, re-noising, a few real steps on tiny models, checkpoints and resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kinema.nn.mmdit import MMDiT, MMDiTParams
from kinema.sampling import student_timesteps
from kinema.train import ladd
from kinema.train.ladd import LADDConfig

TINY = LADDConfig(teacher_samples=6, teacher_steps=2, batch=3, steps=3, feature_blocks=(0, 1), head_width=16,
                  checkpoint_every=2, log_every=1)  # fmt: skip


def test_student_times_are_discrete_and_biased_to_high_noise():
    probs = ladd.student_time_probs(4, 0.7)
    torch.testing.assert_close(probs, torch.tensor([0.7, 0.1, 0.1, 0.1]))
    t = ladd.draw_student_times(20_000, 4, 0.7, torch.Generator().manual_seed(0))
    assert set(t.unique().tolist()) == set(student_timesteps(4))
    assert (t == 1).float().mean().item() == pytest.approx(0.7, abs=0.02)
    assert ladd.draw_student_times(5, 1, 0.7, torch.Generator().manual_seed(0)).eq(1).all()
    with pytest.raises(ValueError, match="high_noise_prob"):
        ladd.student_time_probs(4, 1.0)


def test_noising_and_the_x0_a_velocity_implies():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([1.0, 0.25])
    x_t = ladd.noised(x0, t, eps)
    torch.testing.assert_close(x_t[0], eps[0])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])

    class TrueVelocity(torch.nn.Module):  # v = eps - x0 exactly: x0_hat must be x0
        def forward(self, x, t, context, pooled, mask):
            return eps - x0

    torch.testing.assert_close(ladd.predicted_x0(TrueVelocity(), x_t, t, (None, None, None)), x0)


def test_students_start_as_the_teacher_and_the_teacher_stays_frozen():
    torch.manual_seed(0)
    teacher = MMDiT(MMDiTParams(depth=2, hidden_size=32, num_heads=2, context_dim=16, pooled_dim=8))
    student, ema, disc = ladd.build(TINY, teacher)
    for k, v in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[k], v) and torch.equal(ema.state_dict()[k], v)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and not any(p.requires_grad for p in ema.parameters())
    assert student.blocks[0].img_qkv.weight.data_ptr() != teacher.blocks[0].img_qkv.weight.data_ptr()
    assert disc.features.teacher is teacher


@pytest.mark.slow
@pytest.mark.parametrize("distill_weight", [0.0, 0.5])
def test_a_few_steps_run_checkpoint_round_trip_and_resume(tiny_models, tmp_path, distill_weight):
    cfg = LADDConfig(**{**TINY.__dict__, "distill_weight": distill_weight})
    out, data = tmp_path / "run", tmp_path / "data"
    teacher_before = load_file(str(tiny_models / "denoiser/1/mmdit.safetensors"))
    student, ema = ladd.train(cfg, out, tiny_models, data)

    # The teacher latents were made once, with captions, and are reused by the next run.
    (folder,) = data.iterdir()
    latents, captions = ladd.load_teacher_latents(folder, cfg.teacher_samples)
    assert latents.shape == (6, 4, 16, 16) and len(captions) == 6 and torch.isfinite(latents).all()
    assert captions == ladd.train_captions(0, 6)

    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = ["g_adv", "d_loss", "d_real", "d_fake"] + (["g_distill"] if distill_weight else [])
    assert all(torch.isfinite(torch.tensor([r[k] for k in keys])).all() for r in rows)
    assert rows[0]["d_loss"] == pytest.approx(1.0, abs=0.5)  # hinge at init: logits near 0 cost about 1
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in teacher_before.items())  # the student moved

    # Checkpoints are safetensors and round-trip the student, its EMA and the discriminator heads.
    state = load_file(str(out / "student.safetensors"))
    for k, v in student.state_dict().items():
        assert torch.equal(state[f"model.{k}"], v)
    for k, v in ema.state_dict().items():
        assert torch.equal(state[f"ema.{k}"], v)
    assert any(k.startswith("opt.") for k in state)
    heads = load_file(str(out / "discriminator.safetensors"))
    assert any(k.startswith("model.heads.0.") for k in heads) and not any("teacher" in k for k in heads)

    # Resume: asked for two more steps, it continues from step 3 instead of starting over; the log ends where it did.
    ladd.train(LADDConfig(**{**cfg.__dict__, "steps": 5, "log_every": 2}), out, tiny_models, data)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_the_exported_student_is_float16_on_disk_and_serves_as_a_denoiser(tmp_path):
    from kinema.inference.networks import load_network
    from kinema.nn.checkpoint import read_metadata

    torch.manual_seed(0)
    student = MMDiT(MMDiTParams(depth=2, hidden_size=32, num_heads=2))
    for p in student.parameters():
        torch.nn.init.normal_(p, std=0.02)
    card = {"student_steps": 4, "seed": 0, "metrics": {"n": 1}}
    path = ladd.export_student(student, tmp_path, "denoiser_4step", card, "python -m kinema.train.ladd --x 1")
    assert path == tmp_path / "denoiser_4step/1/mmdit.safetensors"
    assert all(v.dtype == torch.float16 for v in load_file(str(path)).values())
    assert read_metadata(path)["card"] == card
    readme = (tmp_path / "denoiser_4step/README.md").read_text()
    assert "4-step LADD student" in readme and "python -m kinema.train.ladd --x 1" in readme

    network = load_network("denoiser", path.parent, {"weights": "mmdit.safetensors"})
    g = torch.Generator().manual_seed(1)
    x, ctx, pooled = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 384, generator=g), torch.randn(2, 384)
    inputs = {"X": x.numpy(), "T": torch.full((2, 1), 0.75).numpy(), "CONTEXT": ctx.numpy(),
              "CONTEXT_MASK": torch.ones(2, 5, dtype=torch.bool).numpy(), "POOLED": pooled.numpy()}  # fmt: skip
    student.load_state_dict({k: v.half().float() for k, v in student.state_dict().items()})  # what fp16 keeps
    with torch.inference_mode():  # not no_grad: see the note in ladd.train on MMDiT's CPU buffers
        expected = student(x, torch.full((2,), 0.75), ctx, pooled, torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(torch.from_numpy(network(inputs)["VELOCITY"]), expected, rtol=1e-4, atol=1e-5)
