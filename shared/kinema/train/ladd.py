"""Distil the MMDiT denoiser into a few-step student with latent adversarial diffusion distillation (LADD).

    python -m kinema.train.ladd --student-steps 4 --max-seconds 1500 --out runs/ladd-4step --export models

Sauer et al. 2024, "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation":
- the student starts as a copy of the teacher and is trained at a few discrete flow times t (1, 0.75, 0.5,
  0.25 for four steps), drawn with weights that favour t = 1, to map x_t = (1 - t) x0 + t eps straight to
  x0_hat = x_t - t v_student(x_t, t) (sec. 3, "student timesteps");
- the data x0 are latents the teacher generated (28 Euler steps with CFG from captions of the synthetic
  world), so no real image is needed (sec. 3, "synthetic data"); they are made once and kept on disk;
- x0_hat and x0 are re-noised to a logit-normal t_hat biased to high noise before the discriminator
  (`kinema.nn.discriminator`: frozen teacher features + trainable heads); hinge loss for both players;
- an optional distillation loss pulls x0_hat to the teacher's guided denoising of the re-noised x0_hat (ADD
  sec. 3.2); off by default, as LADD finds it unnecessary.
The student keeps an EMA; runs are seeded, checkpoint as they go, resume, and stop on `--max-seconds`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from kinema.nn.discriminator import DiscriminatorParams, LatentDiscriminator
from kinema.nn.mmdit import MMDiT
from kinema.sampling.schedule import logit_normal_t
from kinema.sampling.student import student_timesteps
from kinema.train.adversarial import discriminator_hinge_loss, generator_loss
from kinema.train.runtime import add_runtime_args, resolve_device
from kinema.train.state import ema_update, load_train_state, save_train_state

SHARD = 256  # teacher latents per file: generation resumes shard by shard
# Called as (stage, done, total): stage "data" after each batch of teacher latents (done of teacher_samples), "train"
# after each iteration (done of cfg.steps). It may raise to stop the run (a job's cancel); the last checkpoint stays.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LADDConfig:
    student_steps: int = 4
    high_noise_prob: float = 0.7  # P(t = 1); the other student times share the rest equally
    teacher_samples: int = 2048  # teacher latents (train-split captions 0..n-1)
    teacher_steps: int = 28
    teacher_guidance: float = 4.0
    size: int = 64  # image side the latents decode to
    renoise_mean: float = 1.0  # logit-normal t_hat for the discriminator's inputs, biased to high noise
    renoise_std: float = 1.0
    feature_blocks: tuple[int, ...] = (0, 1, 2, 3)
    head_width: int = 128
    batch: int = 32
    lr_student: float = 2e-5
    lr_disc: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)
    distill_weight: float = 0.0  # optional distillation loss (ADD eq. 5 with a uniform weighting)
    ema_decay: float = 0.99
    steps: int = 100_000
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10


# ---- data: teacher samples, made once ------------------------------------------------------------------------


def teacher_data_dir(root: Path, teacher_sha256: str, cfg: LADDConfig) -> Path:
    """Folder of a teacher's latent set; the name pins what makes the latents (teacher, steps, CFG, size, seed)."""
    key = hashlib.sha256(json.dumps([teacher_sha256, cfg.teacher_steps, cfg.teacher_guidance, cfg.size,
                                     cfg.seed]).encode()).hexdigest()[:12]  # fmt: skip
    return root / f"teacher-{teacher_sha256[:12]}-{key}"


def train_captions(start: int, count: int) -> list[str]:
    """Captions of train-split scenes start..start+count-1 (no rendering: captions come from the scene)."""
    from kinema.data import World
    from kinema.data.scene import caption

    world = World()
    return [caption(world.scene("train", i), world.params.fov_deg) for i in range(start, start + count)]


@torch.no_grad()
def generate_teacher_latents(
    teacher: MMDiT,
    teacher_sha256: str,
    encoder,
    folder: Path,
    cfg: LADDConfig,
    downscale: int,
    batch: int = 32,
    progress: Progress | None = None,
) -> None:
    """Sample `cfg.teacher_samples` latents with the teacher (Euler, CFG) into shards of `SHARD`; skips done shards.

    Latent i is caption i of the train split drawn from `initial_noise(seed + i)`: what `text_to_image` with
    that prompt and seed samples (up to float rounding between batch sizes).
    """
    from kinema.pipelines.local import LocalDenoiser
    from kinema.pipelines.protocols import SampleSpec
    from kinema.sampling.samplers import initial_noise

    folder.mkdir(parents=True, exist_ok=True)
    denoiser = LocalDenoiser(teacher, teacher_sha256)
    spec = SampleSpec(steps=cfg.teacher_steps, guidance=cfg.teacher_guidance)
    uncond = encoder.encode([""])
    side = cfg.size // downscale
    for first in range(0, cfg.teacher_samples, SHARD):
        path, count = folder / f"shard-{first // SHARD:05d}.safetensors", min(SHARD, cfg.teacher_samples - first)
        if _shard_size(path) >= count:
            continue
        t0 = time.perf_counter()
        captions = train_captions(first, count)
        parts = []
        for i in range(0, count, batch):
            caps = captions[i : i + batch]
            noise = torch.cat([initial_noise((1, teacher.params.in_channels, side, side), cfg.seed + first + i + j)
                               for j in range(len(caps))])  # fmt: skip
            parts.append(denoiser.sample(noise, encoder.encode(caps), uncond, spec, None))  # (b, C, h, w)
            if progress is not None:
                progress("data", first + i + len(caps), cfg.teacher_samples)
        meta = {"captions": json.dumps(captions), "first": str(first), "teacher_sha256": teacher_sha256,
                "teacher_steps": str(cfg.teacher_steps), "teacher_guidance": str(cfg.teacher_guidance)}  # fmt: skip
        tmp = path.with_suffix(".tmp")
        save_file({"latents": torch.cat(parts).contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)  # a shard is whole or absent
        print(json.dumps({"teacher_shard": first // SHARD, "latents": count,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)  # fmt: skip


def _shard_size(path: Path) -> int:
    """Latents in a shard file (0 if absent); a set made smaller than a shard is topped up when asked for more."""
    if not path.exists():
        return 0
    with safe_open(str(path), framework="pt") as f:
        return len(json.loads(f.metadata()["captions"]))


def load_teacher_latents(folder: Path, count: int) -> tuple[Tensor, list[str]]:
    """The first `count` teacher latents (N, C, h, w) of a folder and their captions."""
    latents, captions = [], []
    for first in range(0, count, SHARD):
        path = folder / f"shard-{first // SHARD:05d}.safetensors"
        if _shard_size(path) < min(SHARD, count - first):
            raise FileNotFoundError(f"teacher latents {path} are missing or short; generate them first (--data-only)")
        with safe_open(str(path), framework="pt") as f:
            captions += json.loads(f.metadata()["captions"])
        latents.append(load_file(str(path))["latents"])
    return torch.cat(latents)[:count], captions[:count]


# ---- the method's pure pieces ----------------------------------------------------------------------------------


def student_time_probs(steps: int, high_noise_prob: float) -> Tensor:
    """Probabilities (steps,) of the student times `student_timesteps(steps)`: t = 1 gets `high_noise_prob`."""
    if steps == 1:
        return torch.ones(1)
    if not 0 < high_noise_prob < 1:
        raise ValueError(f"high_noise_prob must lie in (0, 1), got {high_noise_prob}")
    rest = (1 - high_noise_prob) / (steps - 1)
    return torch.tensor([high_noise_prob] + [rest] * (steps - 1))


def draw_student_times(n: int, steps: int, high_noise_prob: float, generator: torch.Generator) -> Tensor:
    """n student times (n,) from the discrete set, biased to high noise (LADD sec. 3)."""
    times = torch.tensor(student_timesteps(steps))
    idx = torch.multinomial(student_time_probs(steps, high_noise_prob), n, replacement=True, generator=generator)
    return times[idx]


def noised(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Rectified-flow forward process x_t = (1 - t) x0 + t eps for t (B,)."""
    tt = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - tt) * x0 + tt * eps


def predicted_x0(model: MMDiT, x_t: Tensor, t: Tensor, cond: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """x0_hat = x_t - t v(x_t, t | text): the clean sample a velocity implies. cond = (tokens, mask, pooled)."""
    v = model(x_t, t, cond[0], cond[2], cond[1])
    return x_t - t.view(-1, 1, 1, 1) * v


# ---- training ------------------------------------------------------------------------------------------------


def build(cfg: LADDConfig, teacher: MMDiT) -> tuple[MMDiT, MMDiT, LatentDiscriminator]:
    """(student, its EMA, discriminator): both students start as exact copies of the teacher, which stays frozen."""
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    ema = copy.deepcopy(teacher).requires_grad_(False).eval()
    dparams = DiscriminatorParams.for_teacher(teacher.params, feature_blocks=cfg.feature_blocks,
                                              head_width=cfg.head_width)  # fmt: skip
    disc = LatentDiscriminator(teacher, dparams).to(next(teacher.parameters()).device)
    return student, ema, disc


def _null_cond(encoder, length: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    e = encoder.encode([""])
    pad = length - e.tokens.shape[1]
    return F.pad(e.tokens, (0, 0, 0, pad)).to(device), F.pad(e.mask, (0, pad)).to(device), e.pooled.to(device)


def train(
    cfg: LADDConfig,
    out: Path,
    models_dir: Path,
    data_root: Path,
    device: torch.device | None = None,
    max_seconds: float | None = None,
    data_only: bool = False,
    teacher: str = "denoiser",
    progress: Progress | None = None,
) -> tuple[MMDiT, MMDiT] | None:
    """Make the teacher data if missing, then train (or resume); returns (student, EMA student) on the CPU.

    `teacher`: the repository's denoiser model to distil; `progress`: see `Progress`.
    """
    from kinema.repository import load_autoencoder, load_denoiser, load_text_encoder_default
    from kinema.train.flow import Conditioning, text_cache

    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    teacher_name = teacher
    teacher, teacher_sha = load_denoiser(models_dir, name=teacher_name)
    encoder = load_text_encoder_default()
    folder = teacher_data_dir(data_root, teacher_sha, cfg)
    t0 = time.perf_counter()
    downscale = load_autoencoder(models_dir)[0].params.downscale
    generate_teacher_latents(teacher, teacher_sha, encoder, folder, cfg, downscale, progress=progress)
    print(json.dumps({"teacher_data": str(folder), "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    if data_only:
        return None
    latents, captions = load_teacher_latents(folder, cfg.teacher_samples)
    cond, cap_idx = text_cache(captions, encoder)
    null = _null_cond(encoder, cond.tokens.shape[1], device) if cfg.distill_weight else None
    del encoder
    latents, cap_idx = latents.to(device), cap_idx.to(device)
    cond = Conditioning(cond.tokens.to(device), cond.mask.to(device), cond.pooled.to(device))

    student, ema, disc = build(cfg, teacher.to(device))
    opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.lr_student, betas=cfg.betas, weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.heads.parameters(), lr=cfg.lr_disc, betas=cfg.betas, weight_decay=0.0)
    counters = {"step": 0, "samples": 0, "seconds": 0.0}
    g_path, d_path, log = out / "student.safetensors", out / "discriminator.safetensors", out / "log.jsonl"
    if g_path.exists():
        counters = load_train_state(g_path, student, opt_g, ema)
        d_counters = load_train_state(d_path, disc.heads, opt_d)
        if d_counters["step"] != counters["step"]:  # a crash between the two writes: one checkpoint apart
            print(f"note: discriminator heads from step {d_counters['step']}, student from {counters['step']}")
        print(f"resumed at step {counters['step']}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "teacher": teacher_name,
                                                 "teacher_sha256": teacher_sha, "teacher_data": str(folder)},
                                                indent=2))  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + counters["step"])
    n_student, n_heads = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (student, disc.heads))
    print(f"LADD: student {n_student:.2f}M, discriminator heads {n_heads:.2f}M, {len(latents)} teacher latents",
          flush=True)  # fmt: skip
    start, start_seconds, window = time.perf_counter() - counters["seconds"], counters["seconds"], time.perf_counter()
    sums: dict[str, float] = {}
    while counters["step"] < cfg.steps and not (max_seconds and counters["seconds"] - start_seconds >= max_seconds):
        # Randomness comes from one CPU generator whatever the device, so a run is the same draw everywhere.
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        t = draw_student_times(cfg.batch, cfg.student_steps, cfg.high_noise_prob, gen)
        t_hat = logit_normal_t(cfg.batch, cfg.renoise_mean, cfg.renoise_std, generator=gen)
        eps, eps_hat = (torch.randn((cfg.batch, *latents.shape[1:]), generator=gen) for _ in range(2))
        idx, t, t_hat, eps, eps_hat = (a.to(device) for a in (idx, t, t_hat, eps, eps_hat))
        x0, c = latents[idx], cond.take(cap_idx[idx])

        # Student (generator) step: fool the discriminator through the frozen teacher's features.
        disc.heads.requires_grad_(False)
        x0_hat = predicted_x0(student, noised(x0, t, eps), t, c)  # (B, C, h, w)
        fake = noised(x0_hat, t_hat, eps_hat)
        feats = disc.features(fake, t_hat, c[0], c[2], c[1])  # per block (B, N, D), graph back to the student
        hp = x0.shape[2] // disc.patch_size
        g_adv = generator_loss(disc.heads(feats, t_hat, c[2], hp, hp))
        g_loss = g_adv
        if cfg.distill_weight:
            g_distill = distillation_loss(teacher, x0_hat, fake.detach(), t_hat, c, null, cfg.teacher_guidance)
            g_loss = g_loss + cfg.distill_weight * g_distill
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_g.step()
        disc.heads.requires_grad_(True)

        # Discriminator step: teacher latents against the student's, both re-noised to the same t_hat.
        # inference_mode, not no_grad: MMDiT's CPU MLP buffers, once made under inference_mode (teacher sampling),
        # cannot be written under no_grad in the same thread.
        with torch.inference_mode():
            real_feats = disc.features(noised(x0, t_hat, eps_hat), t_hat, c[0], c[2], c[1])
        real_feats = [f.clone() for f in real_feats]  # normal tensors again, which autograd may save for the heads
        fake_feats = [f.detach() for f in feats]  # the teacher's features do not depend on the heads: reuse them
        real_logits = disc.heads(real_feats, t_hat, c[2], hp, hp)
        fake_logits = disc.heads(fake_feats, t_hat, c[2], hp, hp)
        d_loss = discriminator_hinge_loss(real_logits, fake_logits)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        counters["step"] += 1
        counters["samples"] += cfg.batch
        ema_update(ema, student, min(cfg.ema_decay, (1 + counters["step"]) / (10 + counters["step"])))
        counters["seconds"] = time.perf_counter() - start
        stats = {"g_adv": g_adv.item(), "d_loss": d_loss.item(), "d_real": real_logits.mean().item(),
                 "d_fake": fake_logits.mean().item()}  # fmt: skip
        if cfg.distill_weight:
            stats["g_distill"] = g_distill.item()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        if counters["step"] % cfg.log_every == 0:
            rate = cfg.log_every * cfg.batch / (time.perf_counter() - window)
            window = time.perf_counter()
            row = {**counters, **{k: round(v / cfg.log_every, 4) for k, v in sums.items()},
                   "samples_per_s": round(rate, 1)}  # fmt: skip
            sums = {}
            print(json.dumps(row), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if counters["step"] % cfg.checkpoint_every == 0 or counters["step"] == cfg.steps:
            save_checkpoints(g_path, d_path, student, disc, opt_g, opt_d, ema, counters)
        if progress is not None:
            progress("train", counters["step"], cfg.steps)
    if sums:  # the log's last row is where the run ended
        with log.open("a") as f:
            f.write(json.dumps({**counters, **{k: round(v / (counters["step"] % cfg.log_every), 4)
                                               for k, v in sums.items()}}) + "\n")  # fmt: skip
    if counters["step"] % cfg.checkpoint_every:
        save_checkpoints(g_path, d_path, student, disc, opt_g, opt_d, ema, counters)
    return student.cpu(), ema.cpu()


def save_checkpoints(g_path: Path, d_path: Path, student, disc, opt_g, opt_d, ema, counters: dict) -> None:
    """Both players' resumable states (two files: a crash between the writes leaves them one checkpoint apart)."""
    save_train_state(d_path, disc.heads, opt_d, counters)
    save_train_state(g_path, student, opt_g, counters, ema)


def distillation_loss(
    teacher: MMDiT,
    x0_hat: Tensor,
    fake: Tensor,
    t_hat: Tensor,
    cond: tuple[Tensor, Tensor, Tensor],
    null: tuple[Tensor, Tensor, Tensor] | None,
    guidance: float,
) -> Tensor:
    """ADD's distillation loss (Sauer et al. 2023, eq. 5): || x0_hat - sg(teacher's guided x0 from `fake`) ||^2."""
    from kinema.sampling.guidance import cfg_velocity

    if null is None:
        raise ValueError("the distillation loss needs the empty prompt's conditioning for CFG")
    b = fake.shape[0]
    with torch.inference_mode():
        tokens = torch.cat([cond[0], null[0].expand(b, -1, -1)])
        mask = torch.cat([cond[1], null[1].expand(b, -1)])
        pooled = torch.cat([cond[2], null[2].expand(b, -1)])
        v_cond, v_uncond = teacher(torch.cat([fake, fake]), torch.cat([t_hat, t_hat]), tokens, pooled, mask).chunk(2)
        target = fake - t_hat.view(-1, 1, 1, 1) * cfg_velocity(v_cond, v_uncond, guidance)
    return (x0_hat - target.clone()).pow(2).mean()


# ---- export ----------------------------------------------------------------------------------------------------


def export_student(
    ema: MMDiT, models_dir: Path, name: str, card: dict, command: str, dtype: torch.dtype = torch.float16
) -> Path:
    """Write `models/<name>/1/mmdit.safetensors` (EMA weights, `dtype`) and the model card beside it."""
    from kinema.nn.checkpoint import save_checkpoint
    from kinema.train.card import write_model_card

    path = models_dir / name / "1" / "mmdit.safetensors"
    state = {k: v.to(dtype) for k, v in ema.state_dict().items()}
    save_checkpoint(path, state, ema.params, {"card": card})
    write_model_card(path.parent.parent, f"{name}: {card['student_steps']}-step LADD student of the tiny MMDiT "
                     "(EMA weights)", command, card)  # fmt: skip
    return path


def run_card(cfg: LADDConfig, out: Path) -> dict:
    """The model card's facts of a finished run in `out`: config, data, teacher, how far it got (its log's last row)."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"student_steps": cfg.student_steps, "config": dataclasses.asdict(cfg), "seed": cfg.seed,
            "data": f"{cfg.teacher_samples} teacher latents ({cfg.teacher_steps} Euler steps, CFG "
                    f"{cfg.teacher_guidance}) of train-split captions 0..{cfg.teacher_samples - 1}",
            "teacher_sha256": json.loads((out / "config.json").read_text())["teacher_sha256"],
            "steps_done": log[-1]["step"], "samples_seen": log[-1]["samples"],
            "train_seconds": round(log[-1]["seconds"], 1),
            "last_losses": {k: v for k, v in log[-1].items() if k in ("g_adv", "d_loss", "d_real", "d_fake",
                                                                       "g_distill")}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = LADDConfig()
    ap.add_argument("--student-steps", type=int, default=d.student_steps)
    ap.add_argument("--high-noise-prob", type=float, default=d.high_noise_prob, help="P(student time = 1)")
    ap.add_argument("--teacher-samples", type=int, default=d.teacher_samples, help="teacher latents to train on")
    ap.add_argument("--teacher-steps", type=int, default=d.teacher_steps)
    ap.add_argument("--teacher-guidance", type=float, default=d.teacher_guidance)
    ap.add_argument("--renoise-mean", type=float, default=d.renoise_mean, help="logit-normal m of t_hat")
    ap.add_argument("--renoise-std", type=float, default=d.renoise_std, help="logit-normal s of t_hat")
    ap.add_argument("--feature-blocks", type=int, nargs="+", default=list(d.feature_blocks))
    ap.add_argument("--head-width", type=int, default=d.head_width)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr-student", type=float, default=d.lr_student)
    ap.add_argument("--lr-disc", type=float, default=d.lr_disc)
    ap.add_argument("--distill-weight", type=float, default=d.distill_weight, help="0 = adversarial loss only")
    ap.add_argument("--ema-decay", type=float, default=d.ema_decay)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--models", type=Path, default=Path("models"), help="model repository with the teacher")
    ap.add_argument("--data", type=Path, default=Path("runs/ladd-data"), help="where teacher latent sets are kept")
    ap.add_argument("--data-only", action="store_true", help="make the teacher latents and stop")
    ap.add_argument("--out", type=Path, default=Path("runs/ladd"))
    ap.add_argument("--export", type=Path, default=None, help="models/ folder to write the EMA student into")
    ap.add_argument("--name", default=None, help="model name under --export (default denoiser_<n>step)")
    ap.add_argument("--eval-n", type=int, default=200, help="held-out prompts for the card's attribute accuracy")
    add_runtime_args(ap)
    args = ap.parse_args(argv)
    device = resolve_device(args)
    cfg = LADDConfig(student_steps=args.student_steps, high_noise_prob=args.high_noise_prob,
                     teacher_samples=args.teacher_samples, teacher_steps=args.teacher_steps,
                     teacher_guidance=args.teacher_guidance, renoise_mean=args.renoise_mean,
                     renoise_std=args.renoise_std, feature_blocks=tuple(args.feature_blocks),
                     head_width=args.head_width, batch=args.batch, lr_student=args.lr_student, lr_disc=args.lr_disc,
                     distill_weight=args.distill_weight, ema_decay=args.ema_decay, steps=args.steps, seed=args.seed,
                     checkpoint_every=args.checkpoint_every or LADDConfig.checkpoint_every)  # fmt: skip
    result = train(cfg, args.out, args.models, args.data, device, args.max_seconds, args.data_only)
    if result is None:
        return
    _, ema = result
    from kinema.nn.checkpoint import save_checkpoint

    card = run_card(cfg, args.out)
    if args.eval_n:
        card["metrics"] = quick_accuracy(ema, args.models, args.eval_n, cfg.student_steps)
        print(json.dumps(card["metrics"]), flush=True)
    save_checkpoint(args.out / "student-ema.safetensors", ema.state_dict(), ema.params, {"card": card})
    if args.export:
        command = "python -m kinema.train.ladd " + shlex.join(sys.argv[1:] if argv is None else argv)
        path = export_student(ema, args.export, args.name or f"denoiser_{cfg.student_steps}step", card, command)
        print(f"wrote {path}")


def quick_accuracy(student: MMDiT, models_dir: Path, n: int, trained_steps: int) -> dict:
    """Attribute accuracy (the probe) of the student at each step count dividing its own, on n test prompts."""
    from kinema.eval.generation import generate_images, held_out_prompts
    from kinema.eval.probe import Probe
    from kinema.eval.scoring import evaluate
    from kinema.pipelines.local import LocalAutoencoder, LocalDenoiser
    from kinema.repository import load_autoencoder, load_text_encoder_default

    prompts, truths = held_out_prompts(n)
    encoder, autoencoder = load_text_encoder_default(), LocalAutoencoder(*load_autoencoder(models_dir))
    denoiser, probe = LocalDenoiser(student.eval(), "student"), Probe.from_file()
    out = {"n": n}
    for steps in (s for s in (1, 2, 4, 8) if s <= trained_steps and trained_steps % s == 0):
        # Euler over the student's times (1, ..., 1/steps) without CFG: what the served pipeline runs.
        images = generate_images(prompts, encoder, denoiser, autoencoder, steps=steps, guidance=1.0)
        acc = evaluate(probe, images, truths)
        out[f"{steps}_steps"] = {k: round(acc[k], 4) for k in ("colour", "colour_shape", "relation")}
    return out


if __name__ == "__main__":
    main()
