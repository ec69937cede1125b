"""Train the monocular depth network on the synthetic world's exact depth (MiDaS losses).

    python -m kinema.train.depth --steps 3000 --out runs/depth --export models

Targets are inverse depth (disparity) from the renderer's exact per-pixel depth, normalised per image
(median / mean absolute deviation, MiDaS eq. 6-7). The loss is MiDaS's scale-and-shift-invariant loss
(least-squares alignment per image, eq. 4, then MSE or L1) plus its multi-scale gradient matching term
(eq. 11). Augmentations (flips, zoom crops, colour jitter, grey, blur, noise and, optionally, real-photo
luminance textures painted over floor and wall) keep the network from leaning on the world's flat colours.
Seeded; checkpoints as it goes and resumes from them; `--max-seconds` ends a run on a time budget;
`--export` writes `models/depth/1/depth.safetensors` and its model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kinema.data import World
from kinema.nn.checkpoint import save_checkpoint
from kinema.nn.depth import (
    PRESETS,
    DepthNet,
    align_scale_shift,
    estimate,
    gradient_matching_loss,
    normalise_disparity,
    ssi_loss,
)
from kinema.train.runtime import add_runtime_args, resolve_device
from kinema.train.state import load_train_state, save_train_state

CACHE = Path(".cache/kinema")
# The real image the depth evaluation scores against is never used as a training texture.
HELDOUT_REAL = "stereo_motorcycle"


@dataclass(frozen=True)
class DepthTrainConfig:
    preset: str = "mini"
    steps: int = 3000
    batch: int = 16
    lr: float = 2e-3
    loss: str = "mse"  # after the per-image least-squares alignment: "mse" or "l1"
    grad_weight: float = 0.5  # multi-scale gradient matching (MiDaS eq. 11); 0 disables it
    grad_scales: int = 4
    pool: int = 20000  # training renders (train split), rendered once and cached
    texture_prob: float = 0.3  # chance an image gets real-photo textures on floor and wall (0 = off)
    colour_aug: bool = True
    seed: int = 0
    checkpoint_every: int = 250


def render_depth_pool(world: World, split: str, count: int, workers: int = 1) -> dict[str, np.ndarray]:
    """{"rgb": (N, H, W, 3) uint8, "depth": (N, H, W) float32, "instances": (N, H, W) uint8} of `split` 0..N-1.

    Rendered once (over `workers` processes) and cached under `.cache/kinema`; the result does not depend
    on `workers`.
    """
    key = hashlib.sha256(json.dumps([dataclasses.asdict(world.params), split, count]).encode()).hexdigest()[:16]
    path = CACHE / f"depth-{split}-{count}-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if workers > 1 and count >= 2 * workers:
        import multiprocessing

        chunk = -(-count // (4 * workers))
        jobs = [(world.params, split, s, min(chunk, count - s)) for s in range(0, count, chunk)]
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    else:
        out = _render_chunk((world.params, split, 0, count))
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.rename(path)  # written whole or not at all
    return out


def _render_chunk(args) -> dict[str, np.ndarray]:
    params, split, start, count = args
    world = World(params)
    samples = [world.sample(split, start + i) for i in range(count)]
    return {
        "rgb": np.stack([np.round(s.rgb * 255).astype(np.uint8) for s in samples]),
        "depth": np.stack([s.depth for s in samples]).astype(np.float32),
        "instances": np.stack([s.instances for s in samples]),
    }


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _real_textures(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 1, size, size) luminance crops of the real training photos (the evaluation's photo left out)."""
    from kinema.data.real import TRAIN_IMAGES, _skimage, random_crops

    photos = tuple(_skimage(name) for name in TRAIN_IMAGES if name != HELDOUT_REAL)
    crops = random_crops(photos, n, size, np.random.default_rng([seed, 7]))
    grey = torch.from_numpy(crops).float().mean(-1) / 255.0  # (n, size, size)
    return grey[:, None]


class DepthBatches:
    """The training pool in memory (on the training device) and augmented batches drawn from it."""

    def __init__(self, cfg: DepthTrainConfig, pool: dict[str, np.ndarray], device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.rgb = torch.from_numpy(pool["rgb"]).to(device)  # (N, H, W, 3) uint8
        self.disparity = torch.from_numpy(1.0 / np.maximum(pool["depth"], 1e-3)).to(device)  # (N, H, W)
        self.background = torch.from_numpy(pool["instances"] == 0).to(device)  # (N, H, W)
        size = self.rgb.shape[1]
        self.textures = _real_textures(2048, size, cfg.seed).to(device) if cfg.texture_prob > 0 else None

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 3, H, W) in [-1, 1], normalised disparity (B, 1, H, W))."""
        cfg, b = self.cfg, self.cfg.batch
        idx = torch.randint(0, len(self.rgb), (b,), generator=gen).to(self.device)
        x = self.rgb[idx].permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
        d = self.disparity[idx][:, None]  # (B, 1, H, W)
        bg = self.background[idx][:, None].float()
        u = lambda *shape: torch.rand(*shape, generator=gen).to(self.device)
        if self.textures is not None:
            tex = self.textures[torch.randint(0, len(self.textures), (b,), generator=gen).to(self.device)]
            strength = (u(b, 1, 1, 1) < cfg.texture_prob).float() * (0.3 + 0.7 * u(b, 1, 1, 1))
            x = x * (1 + strength * bg * (2 * tex - 1))  # real-photo luminance painted over floor and wall
        if cfg.colour_aug:
            x = _colour_jitter(x, u)
        x, d = _zoom_and_flip(x, d, u)
        x = x.clamp(0, 1) * 2 - 1
        return x, normalise_disparity(d)


def _colour_jitter(x: torch.Tensor, u) -> torch.Tensor:
    b = len(x)
    perm = torch.stack([torch.randperm(3, generator=None) for _ in range(b)]).to(x.device)  # (B, 3)
    swap = u(b) < 0.5
    x = torch.where(swap[:, None, None, None], torch.gather(x, 1, perm[:, :, None, None].expand_as(x)), x)
    x = x * (0.7 + 0.6 * u(b, 3, 1, 1))  # per-channel gains
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (0.6 + 0.8 * u(b, 1, 1, 1))  # contrast
    grey = (u(b, 1, 1, 1) < 0.2).float()
    x = grey * x.mean(1, keepdim=True).expand_as(x) + (1 - grey) * x
    blur = u(b, 1, 1, 1) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0], device=x.device)
        k = (k[:, None] * k[None]) / 16
        smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
        x = torch.where(blur, smooth, x)
    return x + 0.03 * u(b, 1, 1, 1) * torch.randn_like(x)


def _zoom_and_flip(x: torch.Tensor, d: torch.Tensor, u) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of 60-100% of the side resized back (bilinear; depth values unchanged) and mirror flips."""
    b, _, h, w = x.shape
    side = 0.6 + 0.4 * u(b)  # fraction of the image kept
    cx = (1 - side) * (2 * u(b) - 1)  # crop centre in [-1, 1] coords, inside the image
    cy = (1 - side) * (2 * u(b) - 1)
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = side * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = side, cy
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    d = F.grid_sample(d, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x, d


@torch.no_grad()
def depth_metrics(pred_disparity: torch.Tensor, depth: torch.Tensor, max_depth: float = 50.0) -> dict[str, float]:
    """AbsRel and delta<1.25 after per-image least-squares scale-and-shift alignment in disparity space.

    As MiDaS's evaluation: align the prediction to the ground-truth disparity, clamp the aligned
    disparity at 1 / max_depth, invert to depth and compare with the true depth. Tensors (B, 1, H, W).
    """
    gt_disp = 1.0 / depth
    s, t = align_scale_shift(pred_disparity, gt_disp)
    aligned = s[:, None, None, None] * pred_disparity + t[:, None, None, None]
    pred_depth = 1.0 / aligned.clamp_min(1.0 / max_depth)
    absrel = ((pred_depth - depth).abs() / depth).flatten(1).mean(1)  # (B,)
    ratio = torch.maximum(pred_depth / depth, depth / pred_depth)
    delta1 = (ratio < 1.25).float().flatten(1).mean(1)
    return {"absrel": float(absrel.mean()), "delta1": float(delta1.mean()),
            "positive_scale": float((s > 0).float().mean())}  # fmt: skip


@torch.no_grad()
def evaluate_synthetic(model: DepthNet, n: int = 256, split: str = "test") -> dict[str, float]:
    """Aligned AbsRel / delta1 on `n` held-out renders of `split` (never seen in training)."""
    world = World()
    samples = [world.sample(split, i) for i in range(n)]
    rgb = np.stack([np.round(s.rgb * 255).astype(np.uint8) for s in samples])
    depth = torch.from_numpy(np.stack([s.depth for s in samples]))[:, None]  # (n, 1, H, W)
    pred = torch.cat([estimate(model, c) for c in to_tensor(rgb).split(64)])
    # The prior a network gets for free: lower in the picture = nearer (a ramp over rows), aligned the same way.
    ramp = torch.linspace(0, 1, depth.shape[2]).view(1, 1, -1, 1).expand_as(depth).contiguous()
    baseline = depth_metrics(ramp, depth)
    return {"n": n, **depth_metrics(pred, depth), "row_ramp_absrel": baseline["absrel"],
            "row_ramp_delta1": baseline["delta1"]}  # fmt: skip


@torch.no_grad()
def evaluate_motorcycle(model: DepthNet) -> dict[str, float]:
    """Spearman rank correlation of predicted inverse depth with Middlebury's ground-truth disparity.

    `skimage.data.stereo_motorcycle()` (left image, right image, disparity; invalid pixels are inf).
    Two ways to meet the network's resolution: aspect kept (short side to the working resolution,
    what the service does) and squashed to a square; both resized back to the full 500x741 grid. For
    scale, the same correlation of a bare ramp over rows (lower = nearer), which needs no network.
    """
    import skimage.data
    from scipy.stats import spearmanr

    left, _, gt = skimage.data.stereo_motorcycle()
    valid = np.isfinite(gt) & (gt > 0)
    x = to_tensor(left[None])  # (1, 3, 500, 741)
    out: dict[str, float] = {"valid_pixels": int(valid.sum())}
    r = model.params.resolution
    square = F.interpolate(model(F.interpolate(x, size=(r, r), mode="bilinear", antialias=True)),
                           size=x.shape[-2:], mode="bilinear", align_corners=False)  # fmt: skip
    for name, pred in (("aspect_kept", estimate(model, x)), ("square", square)):
        p = pred[0, 0].numpy()
        out[f"spearman_{name}"] = float(spearmanr(p[valid], gt[valid]).statistic)
    rows = np.broadcast_to(np.arange(gt.shape[0], dtype=np.float32)[:, None], gt.shape)
    out["spearman_row_ramp"] = float(spearmanr(rows[valid], gt[valid]).statistic)  # the layout prior alone
    return out


def export(model: DepthNet, models_dir: Path, card: dict) -> Path:
    path = models_dir / "depth/1/depth.safetensors"
    save_checkpoint(path, model.state_dict(), model.params, {"card": card})
    return path


def train(
    cfg: DepthTrainConfig,
    out: Path,
    device: torch.device | None = None,
    max_seconds: float | None = None,
    workers: int = 1,
    pool: dict[str, np.ndarray] | None = None,
    log_every: int = 50,
) -> DepthNet:
    """Train (or resume the run in `out`) and return the network on the CPU. `pool` overrides the rendered one."""
    if cfg.loss not in ("mse", "l1"):
        raise ValueError(f"loss must be 'mse' or 'l1', got {cfg.loss!r}")
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = DepthNet(PRESETS[cfg.preset]).to(device)
    if pool is None:
        pool = render_depth_pool(World(), "train", cfg.pool, workers)
    batches = DepthBatches(cfg, pool, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    ckpt, log = out / "state.safetensors", out / "log.jsonl"
    counters = {"step": 0, "seconds": 0.0}
    if ckpt.exists():
        counters = load_train_state(ckpt, model, opt)
        print(f"resumed at step {counters['step']}", flush=True)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + counters["step"])
    torch.manual_seed(cfg.seed * 1_000_003 + counters["step"])  # the colour channel permutations
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    t0 = time.perf_counter() - counters["seconds"]
    warmup = min(100, max(1, cfg.steps // 10))
    while True:
        progress = counters["step"] / cfg.steps
        if max_seconds:
            progress = max(progress, counters["seconds"] / max_seconds)
        if progress >= 1.0:
            break
        # Linear warm-up, then cosine decay with whichever of steps and time is further along.
        lr = cfg.lr * min(1.0, (counters["step"] + 1) / warmup) * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, d = batches.batch(gen)
        pred = model(x)  # (B, 1, H, W)
        ssi, aligned = ssi_loss(pred, d, kind=cfg.loss)
        grad = gradient_matching_loss(aligned, d, scales=cfg.grad_scales) if cfg.grad_weight else torch.zeros(())
        loss = ssi + cfg.grad_weight * grad
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        counters["step"] += 1
        counters["seconds"] = time.perf_counter() - t0
        if counters["step"] % log_every == 0:
            row = {"step": counters["step"], "ssi": round(ssi.item(), 5), "grad": round(grad.item(), 5),
                   "lr": round(lr, 6), "seconds": round(counters["seconds"], 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if counters["step"] % cfg.checkpoint_every == 0:
            save_train_state(ckpt, model, opt, counters)
    save_train_state(ckpt, model, opt, counters)
    with log.open("a") as f:  # the log's last row is where the run ended
        f.write(json.dumps({"step": counters["step"], "seconds": round(counters["seconds"], 1)}) + "\n")
    return model.cpu()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=DepthTrainConfig.steps)
    ap.add_argument("--batch", type=int, default=DepthTrainConfig.batch)
    ap.add_argument("--lr", type=float, default=DepthTrainConfig.lr)
    ap.add_argument("--seed", type=int, default=DepthTrainConfig.seed)
    ap.add_argument("--preset", default=DepthTrainConfig.preset, choices=sorted(PRESETS))
    ap.add_argument("--loss", default=DepthTrainConfig.loss, choices=("mse", "l1"), help="after the alignment")
    ap.add_argument("--grad-weight", type=float, default=DepthTrainConfig.grad_weight,
                    help="multi-scale gradient matching weight (0 = off)")  # fmt: skip
    ap.add_argument("--pool", type=int, default=DepthTrainConfig.pool, help="training renders")
    ap.add_argument("--texture-prob", type=float, default=DepthTrainConfig.texture_prob,
                    help="chance of real-photo textures on floor and wall (0 = off)")  # fmt: skip
    ap.add_argument("--no-colour-aug", action="store_true")
    ap.add_argument("--eval-n", type=int, default=256, help="held-out test renders scored at the end")
    add_runtime_args(ap)
    ap.add_argument("--out", type=Path, default=Path("runs/depth"))
    ap.add_argument("--export", type=Path, default=None, help="models/ folder to write the shipped weights into")
    args = ap.parse_args(argv)
    device = resolve_device(args)
    cfg = DepthTrainConfig(preset=args.preset, steps=args.steps, batch=args.batch, lr=args.lr, loss=args.loss,
                           grad_weight=args.grad_weight, pool=args.pool, texture_prob=args.texture_prob,
                           colour_aug=not args.no_colour_aug, seed=args.seed,
                           checkpoint_every=args.checkpoint_every or DepthTrainConfig.checkpoint_every)  # fmt: skip
    model = train(cfg, args.out, device, args.max_seconds, args.workers).eval()
    metrics = {"synthetic_test": evaluate_synthetic(model, args.eval_n), "motorcycle": evaluate_motorcycle(model)}
    print(json.dumps(metrics), flush=True)
    log = [json.loads(line) for line in (args.out / "log.jsonl").read_text().splitlines()]
    card = {"config": dataclasses.asdict(cfg), "params": dataclasses.asdict(model.params), "metrics": metrics,
            "steps_done": log[-1]["step"], "train_seconds": log[-1]["seconds"], "seed": cfg.seed,
            "data": f"synthetic world train split (seed 0), first {cfg.pool} renders, exact depth"
                    + (f"; real skimage luminance textures (all train photos but {HELDOUT_REAL})"
                       if cfg.texture_prob > 0 else ""),
            "heldout": f"world test split; skimage {HELDOUT_REAL} (Middlebury disparity)"}  # fmt: skip
    (args.out / "metrics.json").write_text(json.dumps(card, indent=2))
    if args.export:
        import shlex
        import sys

        from kinema.train.card import write_model_card

        path = export(model, args.export, card)
        command = "python -m kinema.train.depth " + shlex.join(sys.argv[1:] if argv is None else argv)
        write_model_card(path.parent.parent, f"depth: monocular relative inverse depth (MiDaS losses), {cfg.preset}",
                         command, card)  # fmt: skip
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
