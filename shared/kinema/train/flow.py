"""Train the MMDiT denoiser with rectified flow in the autoencoder's latent space (SD3).

    python -m kinema.train.flow --steps 20000 --out runs/denoiser --export models

x_t = (1 - t) x_0 + t eps with t ~ logit-normal(m, s) optionally shifted (SD3 sec. 3.1, eq. 23),
loss = || v_theta(x_t, t, c) - (eps - x_0) ||^2, text dropped to the empty prompt for CFG,
EMA weights. `--self-flow` adds Self-Flow's dual-timestep scheduling and EMA-teacher feature prediction
(`kinema.train.self_flow`). Latents and text states of the training scenes are computed once and cached, and
live on the training device with the batches drawn there. Checkpoints as it goes and resumes from
them; EMA snapshots feed the learning curve; `--max-seconds` ends a run on a time budget.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kinema.data import World, cached_images
from kinema.nn.checkpoint import save_checkpoint
from kinema.nn.mmdit import PRESETS, MMDiT
from kinema.sampling.schedule import logit_normal_t, shift_sigmas
from kinema.train.runtime import add_runtime_args, resolve_device
from kinema.train.self_flow import FeatureHead, SelfFlowConfig, self_flow_loss, token_times
from kinema.train.state import ema_update, load_train_state, save_train_state

CACHE = Path(".cache/kinema")


@dataclass(frozen=True)
class FlowTrainConfig:
    preset: str = "tiny"
    samples: int = 40000  # training scenes
    batch: int = 64
    lr: float = 8e-4
    warmup: int = 500
    steps: int = 20000
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    text_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200
    snapshot_every: int = 2000
    self_flow: SelfFlowConfig | None = None  # None = plain rectified flow


@dataclass
class Conditioning:
    """Text states of a set of prompts, padded to one length (float16 to halve the cache)."""

    tokens: torch.Tensor  # (N, L, D)
    mask: torch.Tensor  # (N, L) bool
    pooled: torch.Tensor  # (N, P)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tokens[idx].float(), self.mask[idx], self.pooled[idx].float()


def encode_prompts(encoder, prompts: list[str], batch: int = 256) -> Conditioning:
    """Encode unique prompts once and pad every result to the longest."""
    embs = [encoder.encode(prompts[i : i + batch]) for i in range(0, len(prompts), batch)]
    length = max(e.tokens.shape[1] for e in embs)
    tokens = torch.cat([F.pad(e.tokens, (0, 0, 0, length - e.tokens.shape[1])).cpu() for e in embs]).half()
    mask = torch.cat([F.pad(e.mask, (0, length - e.mask.shape[1])).cpu() for e in embs])
    pooled = torch.cat([e.pooled.cpu() for e in embs]).half()
    return Conditioning(tokens, mask, pooled)


def text_cache(captions: list[str], encoder) -> tuple[Conditioning, torch.Tensor]:
    """(conditioning of the unique captions, index of each caption into it), cached on disk."""
    import hashlib

    unique = sorted(set(captions))
    key = hashlib.sha256(("\n".join(unique) + encoder.fingerprint()).encode()).hexdigest()[:16]
    path = CACHE / f"text-{key}.safetensors"
    if not path.exists():
        t0 = time.perf_counter()
        cond = encode_prompts(encoder, unique)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_file({"tokens": cond.tokens, "mask": cond.mask, "pooled": cond.pooled}, str(path))
        print(f"encoded {len(unique)} unique captions in {time.perf_counter() - t0:.0f}s", flush=True)
    t = load_file(str(path))
    lookup = {c: i for i, c in enumerate(unique)}
    return Conditioning(t["tokens"], t["mask"], t["pooled"]), torch.tensor([lookup[c] for c in captions])


@torch.no_grad()
def latent_cache(images: np.ndarray, autoencoder, tag: str) -> torch.Tensor:
    """Normalised latents (N, C, h, w) of uint8 images, cached per autoencoder weights (encoded where it lives)."""
    from kinema.train.autoencoder import to_tensor

    path = CACHE / f"latents-{tag}-{len(images)}.safetensors"
    if not path.exists():
        t0 = time.perf_counter()
        device = next(autoencoder.parameters()).device
        z = torch.cat([autoencoder.encode(to_tensor(images[i : i + 128]).to(device)).cpu()
                       for i in range(0, len(images), 128)])  # fmt: skip
        CACHE.mkdir(parents=True, exist_ok=True)
        save_file({"latents": z.contiguous()}, str(path))
        print(f"encoded {len(images)} latents in {time.perf_counter() - t0:.0f}s", flush=True)
    return load_file(str(path))["latents"]


def flow_loss(model: MMDiT, x0: torch.Tensor, t: torch.Tensor, cond: tuple, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow (conditional flow matching) MSE with velocity target eps - x0 (SD3 eq. 1-3)."""
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    v = model(xt, t, cond[0], cond[2], cond[1])
    return (v - (noise - x0)).pow(2).mean()


def train(
    cfg: FlowTrainConfig,
    out: Path,
    models_dir: Path,
    init: Path | None = None,
    device: torch.device | None = None,
    amp: bool = False,
    max_seconds: float | None = None,
    workers: int = 1,
) -> tuple[MMDiT, MMDiT]:
    """Train (or resume, or warm start from `init`); returns (model, EMA model) on the CPU.

    `amp` runs the forward pass under bf16 autocast (CUDA only); `max_seconds` ends the run early.
    """
    from kinema.nn.checkpoint import sha256_file
    from kinema.repository import AUTOENCODER_FILES, load_autoencoder, load_text_encoder_default

    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    images, captions = cached_images(World(), "train", cfg.samples, CACHE, workers)
    autoencoder, _ = load_autoencoder(models_dir)
    # Latents depend on the encoder only: a decoder fine-tune keeps the cache valid.
    latents = latent_cache(images, autoencoder.to(device), sha256_file(models_dir / AUTOENCODER_FILES[0])[:12])
    del images, autoencoder
    encoder = load_text_encoder_default()
    encoder.model.to(device)
    cond, cap_idx = text_cache(captions, encoder)
    null = encode_prompts(encoder, [""])
    del encoder
    null_tokens = F.pad(null.tokens.float(), (0, 0, 0, cond.tokens.shape[1] - null.tokens.shape[1])).to(device)
    null_mask = F.pad(null.mask, (0, cond.mask.shape[1] - null.mask.shape[1])).to(device)
    null_pooled = null.pooled.float().to(device)
    latents = latents.to(device)
    cond = Conditioning(cond.tokens.to(device), cond.mask.to(device), cond.pooled.to(device))
    cap_idx = cap_idx.to(device)

    params = PRESETS[cfg.preset]
    if params.in_channels != latents.shape[1]:  # the denoiser speaks the autoencoder's latent
        params = dataclasses.replace(params, in_channels=latents.shape[1], out_channels=latents.shape[1])
    model = MMDiT(params)
    ema = copy.deepcopy(model).requires_grad_(False)
    # What the optimiser trains: the MMDiT, and with Self-Flow its feature head (kept in the training state only).
    trainable: torch.nn.Module = model
    if cfg.self_flow is not None:
        cfg.self_flow.check(params.depth)
        trainable = torch.nn.ModuleDict({"denoiser": model, "head": FeatureHead(params.hidden_size)})
    counters = {"step": 0, "samples": 0, "seconds": 0.0}
    state_path, log = out / "state.safetensors", out / "log.jsonl"
    opt = torch.optim.AdamW(trainable.parameters(), lr=cfg.lr, weight_decay=0.0)
    if state_path.exists():
        counters = load_train_state(state_path, trainable, opt, ema)
        print(f"resumed at step {counters['step']}", flush=True)
    elif init is not None:
        # Warm start from shipped EMA weights (optimizer moments are not shipped): how a later
        # session continues a run whose full training state did not survive.
        from kinema.nn.checkpoint import read_metadata

        state = load_file(str(init))
        model.load_state_dict(state)
        ema.load_state_dict(state)
        card = read_metadata(init).get("card", {})
        counters["samples"] = int(card.get("samples_seen", 0))
        counters["seconds"] = float(card.get("train_seconds", 0.0))
        print(f"warm start from {init} ({counters['samples']} samples seen)", flush=True)
    trainable.to(device)
    ema.to(device)
    for state in opt.state.values():  # moments restored on the CPU follow their parameters
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = v.to(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + counters["step"])
    n_params = sum(p.numel() for p in model.parameters())
    n_tokens = (latents.shape[2] // params.patch_size) * (latents.shape[3] // params.patch_size)
    print(f"MMDiT {cfg.preset}: {n_params / 1e6:.2f}M parameters, {len(latents)} training latents", flush=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    t0 = time.perf_counter() - counters["seconds"]
    start_seconds = counters["seconds"]
    window = time.perf_counter()
    while counters["step"] < cfg.steps and not (max_seconds and counters["seconds"] - start_seconds >= max_seconds):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (counters["step"] + 1) / cfg.warmup)
        # Randomness comes from one CPU generator whatever the device, so a run is the same draw everywhere.
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        drop = (torch.rand(cfg.batch, generator=gen) < cfg.text_dropout).to(device)
        t = shift_sigmas(logit_normal_t(cfg.batch, cfg.logit_mean, cfg.logit_std, generator=gen), cfg.shift)
        noise = torch.randn((cfg.batch, *latents.shape[1:]), generator=gen)
        if cfg.self_flow is not None:  # drawn after the plain run's draws: both see the same batches
            s = shift_sigmas(logit_normal_t(cfg.batch, cfg.logit_mean, cfg.logit_std, generator=gen), cfg.shift)
            t_tokens = token_times(t, s, n_tokens, cfg.self_flow.mask_ratio, gen).to(device)
            s = s.to(device)
        idx, t, noise = idx.to(device), t.to(device), noise.to(device)
        x0 = latents[idx]
        tokens, mask, pooled = cond.take(cap_idx[idx])
        tokens = torch.where(drop[:, None, None], null_tokens, tokens)
        mask = torch.where(drop[:, None], null_mask, mask)
        pooled = torch.where(drop[:, None], null_pooled, pooled)
        parts = {}
        with autocast:
            if cfg.self_flow is None:
                loss = flow_loss(model, x0, t, (tokens, mask, pooled), noise)
            else:
                loss, parts = self_flow_loss(model, ema, trainable["head"], x0, t, s, (tokens, mask, pooled), noise,
                                             t_tokens, cfg.self_flow)  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        opt.step()
        counters["step"] += 1
        counters["samples"] += cfg.batch
        ema_update(ema, model, min(cfg.ema_decay, (1 + counters["step"]) / (10 + counters["step"])))
        counters["seconds"] = time.perf_counter() - t0
        if counters["step"] % 50 == 0:
            rate = 50 * cfg.batch / (time.perf_counter() - window)
            window = time.perf_counter()
            row = {**counters, "loss": round(loss.item(), 5), "samples_per_s": round(rate, 1),
                   **{k: round(v.item(), 5) for k, v in parts.items()}}  # fmt: skip
            print(json.dumps(row), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if counters["step"] % cfg.checkpoint_every == 0 or counters["step"] == cfg.steps:
            save_train_state(state_path, trainable, opt, counters, ema)
        if counters["step"] % cfg.snapshot_every == 0:
            snap = out / "snapshots" / f"ema-{counters['samples']:09d}.safetensors"
            save_checkpoint(snap, ema.state_dict(), ema.params, {"counters": counters})
    if counters["step"] % 50:  # the log's last row is where the run ended
        save_train_state(state_path, trainable, opt, counters, ema)
        with log.open("a") as f:
            f.write(json.dumps({**counters, "loss": round(loss.item(), 5)}) + "\n")
    return model.cpu(), ema.cpu()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=FlowTrainConfig.steps)
    ap.add_argument("--preset", default=FlowTrainConfig.preset, choices=sorted(PRESETS))
    ap.add_argument("--samples", type=int, default=FlowTrainConfig.samples)
    ap.add_argument("--batch", type=int, default=FlowTrainConfig.batch)
    ap.add_argument("--seed", type=int, default=FlowTrainConfig.seed)
    ap.add_argument("--lr", type=float, default=FlowTrainConfig.lr)
    ap.add_argument(
        "--snapshot-every", type=int, default=FlowTrainConfig.snapshot_every, help="steps between EMA snapshots"
    )
    ap.add_argument("--models", type=Path, default=Path("models"), help="model repository with the autoencoder")
    ap.add_argument("--out", type=Path, default=Path("runs/denoiser"))
    ap.add_argument("--export", type=Path, default=None, help="models/ folder to write the shipped EMA weights into")
    ap.add_argument("--init", type=Path, default=None, help="warm start from these EMA weights (a shipped mmdit)")
    sf = SelfFlowConfig()
    ap.add_argument("--self-flow", action="store_true", help="train with Self-Flow (kinema.train.self_flow)")
    ap.add_argument("--mask-ratio", type=float, default=sf.mask_ratio, help="Self-Flow: share of tokens at time s")
    ap.add_argument("--self-flow-weight", type=float, default=sf.weight, help="Self-Flow: representation loss weight")
    ap.add_argument("--student-layer", type=int, default=sf.student_layer, help="Self-Flow: student feature block")
    ap.add_argument("--teacher-layer", type=int, default=sf.teacher_layer, help="Self-Flow: EMA teacher feature block")
    add_runtime_args(ap)
    args = ap.parse_args(argv)
    device = resolve_device(args)
    self_flow = None
    if args.self_flow:
        self_flow = SelfFlowConfig(mask_ratio=args.mask_ratio, weight=args.self_flow_weight,
                                   student_layer=args.student_layer, teacher_layer=args.teacher_layer)  # fmt: skip
    cfg = FlowTrainConfig(preset=args.preset, steps=args.steps, samples=args.samples, batch=args.batch, seed=args.seed,
                          lr=args.lr, snapshot_every=args.snapshot_every, self_flow=self_flow,
                          checkpoint_every=args.checkpoint_every or FlowTrainConfig.checkpoint_every)  # fmt: skip
    _, ema = train(cfg, args.out, args.models, args.init, device, args.amp, args.max_seconds, args.workers)
    if args.export:
        log = [json.loads(line) for line in (args.out / "log.jsonl").read_text().splitlines()]
        card = {"config": dataclasses.asdict(cfg), "steps_done": log[-1]["step"], "samples_seen": log[-1]["samples"],
                "train_seconds": log[-1]["seconds"], "final_loss": log[-1]["loss"]}  # fmt: skip
        import shlex
        import sys

        from kinema.train.card import write_model_card

        command = "python -m kinema.train.flow " + shlex.join(sys.argv[1:] if argv is None else argv)
        card |= {"seed": cfg.seed, "data": f"synthetic world train split, scenes 0..{cfg.samples - 1}",
                 "params": dataclasses.asdict(ema.params)}  # fmt: skip
        path = args.export / "denoiser/1/mmdit.safetensors"
        save_checkpoint(path, ema.state_dict(), ema.params, {"card": card})
        write_model_card(path.parent.parent, f"denoiser: MMDiT {cfg.preset}, rectified flow (EMA weights)", command,
                         card)  # fmt: skip
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
