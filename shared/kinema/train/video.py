"""Train the video MMDiT (Gen-1) from the image denoiser: joint images and clips, depth structure, temporal layers.

    python -m kinema.train.video --init models/denoiser/1/mmdit.safetensors --steps 2000 --out runs/video

Gen-1 (Esser et al. 2023, sec. 3.2-3.4) recipe on the synthetic world, in the shipped autoencoder's latent space:
the network starts as the image MMDiT (`VideoMMDiT.load_image_weights`; every video part starts as the identity),
each step sees a batch of clips (F frames, temporal layers on) and a batch of images (1-frame videos, which skip
the temporal layers), the structure input is each frame's disparity from the world's exact depth degraded to a
level t_s ~ U[0, 1] (`degrade_structure`; a depth network's estimate replaces it later), the content is the
caption (MiniLM) or, with probability `reference_prob`, a random frame's latent (`ReferenceContent`), dropped to
the empty prompt with probability `text_dropout` for classifier-free guidance. The loss is SD3's rectified flow
(`kinema.train.flow.flow_loss`'s target) averaged over frames. New parts train at `lr`, the image model's weights
at `image_lr` (0 freezes them). EMA weights, resumable checkpoints, a time budget and a model card as the image
trainer has.

`evaluate` samples held-out clips with omega_t in a list and measures temporal consistency on the decoded frames:
consecutive-frame difference and warp error against the world's exact motion.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kinema.data import World
from kinema.nn.checkpoint import params_from_metadata, save_checkpoint
from kinema.nn.mmdit import PRESETS as IMAGE_PRESETS
from kinema.nn.mmdit import MMDiTParams
from kinema.nn.video import (
    VideoMMDiT,
    VideoMMDiTParams,
    branch_predictor,
    degrade_structure,
    structure_input,
)
from kinema.sampling.samplers import initial_noise
from kinema.sampling.schedule import logit_normal_t, shift_sigmas
from kinema.sampling.temporal import sample_video, video_schedule
from kinema.train.runtime import add_runtime_args, resolve_device
from kinema.train.state import ema_update, load_train_state, save_train_state

CACHE = Path(".cache/kinema")
# Scene indices of the train split the pools are drawn from: clips and images never share a scene.
CLIP_START, IMAGE_START = 0, 500_000


@dataclass(frozen=True)
class VideoTrainConfig:
    preset: str = "tiny"  # image MMDiT preset when there is no --init (a fresh network)
    temporal_every: int = 1
    frames: int = 4
    clips: int = 400  # training clips rendered
    images: int = 1000  # training images (1-frame videos)
    clip_batch: int = 4
    image_batch: int = 8
    lr: float = 1e-3  # the video parts (temporal, structure, t_s, reference)
    image_lr: float = 1e-4  # the image model's weights; 0 freezes them
    warmup: int = 50
    steps: int = 2000
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    text_dropout: float = 0.1
    reference_prob: float = 0.2
    ema_decay: float = 0.995
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"clips need at least 2 frames, got {self.frames}")
        if self.clip_batch < 1 or self.image_batch < 0:
            raise ValueError("clip_batch must be >= 1 and image_batch >= 0")
        if not 0 <= self.reference_prob <= 1 or not 0 <= self.text_dropout <= 1:
            raise ValueError("reference_prob and text_dropout are probabilities")


@dataclass
class ClipPool:
    """Clips (or 1-frame images) ready for training: latents, undegraded structure, caption indices."""

    latents: torch.Tensor  # (N, F, C, h, w)
    structure: torch.Tensor  # (N, F, 1, h, w) in [-1, 1]
    captions: list[str]
    flow: np.ndarray | None = None  # (N, F-1, H, W, 2) exact forward motion (evaluation pools)
    instances: np.ndarray | None = None  # (N, F, H, W) (evaluation pools)


def render_clips(world: World, split: str, start: int, count: int, frames: int) -> dict[str, np.ndarray]:
    """Clips of scenes start..start+count-1: rgb uint8 (N, F, H, W, 3), disparity, flow, instances, captions."""
    out: dict[str, list] = {"rgb": [], "disparity": [], "flow": [], "instances": [], "captions": []}
    for i in range(start, start + count):
        clip = world.clip(split, i, frames)
        out["rgb"].append(np.round(clip.rgb * 255).astype(np.uint8))
        out["disparity"].append((1.0 / np.maximum(clip.depth, 1e-6)).astype(np.float32))  # as `disparity`
        out["flow"].append(clip.flow)
        out["instances"].append(clip.instances)
        out["captions"].append(clip.caption)
    arrays = {k: np.stack(v) for k, v in out.items() if k != "captions"}
    return {**arrays, "captions": np.array(out["captions"])}


def cached_clips(world: World, split: str, start: int, count: int, frames: int) -> dict[str, np.ndarray]:
    """`render_clips`, rendered once and kept in the cache folder."""
    key = hashlib.sha256(json.dumps([dataclasses.asdict(world.params), split, start, count, frames]).encode())
    path = CACHE / f"clips-{split}-{start}-{count}-{frames}-{key.hexdigest()[:12]}.npz"
    if not path.exists():
        t0 = time.perf_counter()
        data = render_clips(world, split, start, count, frames)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **data)
        tmp.rename(path)  # whole or not at all
        print(f"rendered {count} clips of {frames} frames in {time.perf_counter() - t0:.0f}s", flush=True)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@torch.no_grad()
def encode_frames(autoencoder, rgb: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Normalised latents (N, F, C, h, w) of uint8 clips (N, F, H, W, 3)."""
    from kinema.train.autoencoder import to_tensor

    n, f = rgb.shape[:2]
    flat = rgb.reshape(n * f, *rgb.shape[2:])
    z = torch.cat([autoencoder.encode(to_tensor(flat[i : i + batch])) for i in range(0, len(flat), batch)])
    return z.reshape(n, f, *z.shape[1:])


def clip_pool(world: World, split: str, start: int, count: int, frames: int, autoencoder, tag: str) -> ClipPool:
    """Render (cached), encode (cached per autoencoder `tag`) and normalise the structure of a set of clips."""
    data = cached_clips(world, split, start, count, frames)
    path = CACHE / f"clip-latents-{tag}-{split}-{start}-{count}-{frames}.safetensors"
    if not path.exists():
        t0 = time.perf_counter()
        save_file({"latents": encode_frames(autoencoder, data["rgb"]).contiguous()}, str(path))
        print(f"encoded {count * frames} frames in {time.perf_counter() - t0:.0f}s", flush=True)
    latents = load_file(str(path))["latents"]
    structure = structure_input(torch.from_numpy(data["disparity"]), tuple(latents.shape[-2:]))
    return ClipPool(latents, structure, [str(c) for c in data["captions"]], data["flow"], data["instances"])


def velocity_loss(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Summed squared error against the rectified-flow target eps - x0 (SD3 eq. 1-3); the caller averages."""
    return (v - (noise - x0)).pow(2).sum()


class Content:
    """Text states of the pool captions, the empty prompt, and the per-sample content draw."""

    def __init__(self, encoder, captions: list[str], device: torch.device) -> None:
        from kinema.train.flow import encode_prompts, text_cache

        cond, self.index = text_cache(captions, encoder)
        null = encode_prompts(encoder, [""])
        length = max(cond.tokens.shape[1], null.tokens.shape[1])
        self.tokens = F.pad(cond.tokens.float(), (0, 0, 0, length - cond.tokens.shape[1])).to(device)
        self.mask = F.pad(cond.mask, (0, length - cond.mask.shape[1])).to(device)
        self.pooled = cond.pooled.float().to(device)
        self.null = (
            F.pad(null.tokens.float(), (0, 0, 0, length - null.tokens.shape[1])).to(device),
            F.pad(null.mask, (0, length - null.mask.shape[1])).to(device),
            null.pooled.float().to(device),
        )

    def text(self, caption_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, mask, pooled) of the captions at these positions of the caption list."""
        idx = self.index[caption_idx.cpu()].to(self.tokens.device)
        return self.tokens[idx], self.mask[idx], self.pooled[idx]  # (B, L, Dc), (B, L), (B, Dp)

    def draw(
        self,
        model: VideoMMDiT,
        caption_idx: torch.Tensor,
        reference: torch.Tensor,
        use_reference: torch.Tensor,
        drop: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample: the caption, or the reference latent (B, C, h, w) where `use_reference`, or null where `drop`."""
        tokens, mask, pooled = self.text(caption_idx)  # (B, L, Dc), (B, L), (B, Dp)
        if use_reference.any():
            r_tokens, r_mask, r_pooled = model.reference(reference)  # (B, g*g, Dc), (B, g*g), (B, Dp)
            pad = tokens.shape[1] - r_tokens.shape[1]
            r_tokens, r_mask = F.pad(r_tokens, (0, 0, 0, pad)), F.pad(r_mask, (0, pad))
            tokens = torch.where(use_reference[:, None, None], r_tokens, tokens)
            mask = torch.where(use_reference[:, None], r_mask, mask)
            pooled = torch.where(use_reference[:, None], r_pooled, pooled)
        n_tok, n_mask, n_pooled = self.null
        tokens = torch.where(drop[:, None, None], n_tok, tokens)
        mask = torch.where(drop[:, None], n_mask, mask)
        pooled = torch.where(drop[:, None], n_pooled, pooled)
        return tokens, mask, pooled


def batch_loss(
    model: VideoMMDiT,
    pool: ClipPool,
    content: Content,
    caption_offset: int,
    n: int,
    cfg: VideoTrainConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, int]:
    """(summed squared error, number of elements) of n random samples of `pool`; randomness from `gen` (CPU)."""
    device = pool.latents.device
    idx = torch.randint(0, len(pool.latents), (n,), generator=gen)
    f = pool.latents.shape[1]
    t = shift_sigmas(logit_normal_t(n, cfg.logit_mean, cfg.logit_std, generator=gen), cfg.shift)  # (n,)
    level = torch.rand(n, generator=gen)  # t_s ~ U[0, 1]
    ref_frame = torch.randint(0, f, (n,), generator=gen)
    use_ref = torch.rand(n, generator=gen) < cfg.reference_prob
    drop = torch.rand(n, generator=gen) < cfg.text_dropout
    noise = torch.randn((n, *pool.latents.shape[1:]), generator=gen)
    idx_d, t, level, noise = idx.to(device), t.to(device), level.to(device), noise.to(device)
    x0 = pool.latents[idx_d]  # (n, F, C, h, w)
    structure = degrade_structure(pool.structure[idx_d], level)  # (n, F, 1, h, w)
    tokens, mask, pooled = content.draw(
        model, idx + caption_offset, x0[torch.arange(n, device=device), ref_frame.to(device)],
        use_ref.to(device), drop.to(device),
    )  # fmt: skip
    tt = t.view(-1, 1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    v = model(xt, t, tokens, pooled, mask, structure=structure, structure_level=level)
    return velocity_loss(v, x0, noise), v.numel()


def image_params_of(init: Path | None, preset: str, latent_channels: int) -> MMDiTParams:
    if init is not None:
        return params_from_metadata(init, MMDiTParams)
    p = IMAGE_PRESETS[preset]
    return dataclasses.replace(p, in_channels=latent_channels, out_channels=latent_channels)


def build_model(cfg: VideoTrainConfig, init: Path | None, latent_channels: int) -> VideoMMDiT:
    """The video network: from the image weights at `init` (identity video parts), or fresh from the preset."""
    params = VideoMMDiTParams.from_image(
        image_params_of(init, cfg.preset, latent_channels), temporal_every=cfg.temporal_every
    )
    model = VideoMMDiT(params)
    if init is not None:
        model.load_image_weights(load_file(str(init)))
    return model


def make_optimizer(model: VideoMMDiT, cfg: VideoTrainConfig) -> torch.optim.AdamW:
    new = model.new_parameters()
    new_ids = {id(p) for p in new}
    image = [p for p in model.parameters() if id(p) not in new_ids]
    groups = [{"params": new, "lr": cfg.lr, "base_lr": cfg.lr}]
    if cfg.image_lr > 0:
        groups.append({"params": image, "lr": cfg.image_lr, "base_lr": cfg.image_lr})
    else:
        for p in image:
            p.requires_grad_(False)
    return torch.optim.AdamW(groups, weight_decay=0.0)


def autoencoder_tag(models_dir: Path) -> str:
    """Latents depend on the encoder only: its file's hash names the latent caches."""
    from kinema.nn.checkpoint import sha256_file
    from kinema.repository import AUTOENCODER_FILES

    return sha256_file(models_dir / AUTOENCODER_FILES[0])[:12]


def load_pools(cfg: VideoTrainConfig, models_dir: Path) -> tuple[ClipPool, ClipPool, object]:
    """(clip pool, image pool, autoencoder) on the CPU; renders and encodes once, then reads the cache."""
    from kinema.repository import load_autoencoder

    autoencoder, _ = load_autoencoder(models_dir)
    tag = autoencoder_tag(models_dir)
    world = World()
    clips = clip_pool(world, "train", CLIP_START, cfg.clips, cfg.frames, autoencoder, tag)
    images = clip_pool(world, "train", IMAGE_START, cfg.images, 1, autoencoder, tag)
    return clips, images, autoencoder


def train(
    cfg: VideoTrainConfig,
    out: Path,
    models_dir: Path,
    init: Path | None = None,
    device: torch.device | None = None,
    max_seconds: float | None = None,
) -> tuple[VideoMMDiT, VideoMMDiT]:
    """Train (or resume from `out/state.safetensors`); returns (model, EMA model) on the CPU."""
    from kinema.repository import load_text_encoder_default

    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    clips, images, autoencoder = load_pools(cfg, models_dir)
    latent_channels = clips.latents.shape[2]
    del autoencoder
    encoder = load_text_encoder_default()
    content = Content(encoder, clips.captions + images.captions, device)
    del encoder
    for pool in (clips, images):
        pool.latents, pool.structure = pool.latents.to(device), pool.structure.to(device)

    model = build_model(cfg, init, latent_channels)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model, cfg)
    counters = {"step": 0, "clips": 0, "images": 0, "seconds": 0.0}
    state_path, log = out / "state.safetensors", out / "log.jsonl"
    if state_path.exists():
        counters = load_train_state(state_path, model, opt, ema)
        print(f"resumed at step {counters['step']}", flush=True)
    model.to(device)
    ema.to(device)
    for state in opt.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = v.to(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    n_new = sum(p.numel() for p in model.new_parameters())
    n_all = sum(p.numel() for p in model.parameters())
    print(f"VideoMMDiT: {n_all / 1e6:.2f}M parameters ({n_new / 1e6:.2f}M new), {len(clips.latents)} clips of "
          f"{cfg.frames} frames, {len(images.latents)} images", flush=True)  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + counters["step"])
    t0 = time.perf_counter() - counters["seconds"]
    start_seconds, window, window_step = counters["seconds"], time.perf_counter(), counters["step"]
    sums = {"clip": 0.0, "image": 0.0, "n": 0}
    loss = torch.zeros(())
    while counters["step"] < cfg.steps and not (max_seconds and counters["seconds"] - start_seconds >= max_seconds):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * min(1.0, (counters["step"] + 1) / cfg.warmup)
        clip_sse, clip_n = batch_loss(model, clips, content, 0, cfg.clip_batch, cfg, gen)
        total_sse, total_n = clip_sse, clip_n
        if cfg.image_batch:
            image_sse, image_n = batch_loss(model, images, content, len(clips.captions), cfg.image_batch, cfg, gen)
            total_sse, total_n = total_sse + image_sse, total_n + image_n
            sums["image"] += image_sse.item() / image_n
        loss = total_sse / total_n  # every frame counts once, clip or image
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sums["clip"] += clip_sse.item() / clip_n
        sums["n"] += 1
        counters["step"] += 1
        counters["clips"] += cfg.clip_batch
        counters["images"] += cfg.image_batch
        ema_update(ema, model, min(cfg.ema_decay, (1 + counters["step"]) / (10 + counters["step"])))
        counters["seconds"] = time.perf_counter() - t0
        if counters["step"] % 10 == 0 or counters["step"] == cfg.steps:
            frames = (counters["step"] - window_step) * (cfg.clip_batch * cfg.frames + cfg.image_batch)
            row = {**counters, "seconds": round(counters["seconds"], 1),
                   "clip_loss": round(sums["clip"] / sums["n"], 5), "image_loss": round(sums["image"] / sums["n"], 5),
                   "frames_per_s": round(frames / (time.perf_counter() - window), 1)}  # fmt: skip
            window, window_step, sums = time.perf_counter(), counters["step"], {"clip": 0.0, "image": 0.0, "n": 0}
            print(json.dumps(row), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if counters["step"] % cfg.checkpoint_every == 0:
            save_train_state(state_path, model, opt, counters, ema)
    save_train_state(state_path, model, opt, counters, ema)
    return model.cpu(), ema.cpu()


@torch.no_grad()
def validation_loss(model: VideoMMDiT, pool: ClipPool, content: Content, seed: int = 0, repeats: int = 4) -> dict:
    """Held-out flow loss of the video prediction and of the frame-wise one, on the same draws (t_s = 0)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(pool.latents)
    out = {"video": 0.0, "frame": 0.0}
    tokens, mask, pooled = content.text(torch.arange(n))  # `content` holds the pool's captions
    for _ in range(repeats):
        t = logit_normal_t(n, generator=gen)
        noise = torch.randn(pool.latents.shape, generator=gen)
        tt = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tt) * pool.latents + tt * noise
        for key, temporal in (("video", True), ("frame", False)):
            v = model(xt, t, tokens, pooled, mask, structure=pool.structure, structure_level=torch.zeros(n),
                      temporal=temporal)  # fmt: skip
            out[key] += (v - (noise - pool.latents)).pow(2).mean().item() / repeats
    return out


def warp_error(frames: torch.Tensor, flow: np.ndarray, instances: np.ndarray) -> float:
    """Mean squared error between frame t and frame t+1 warped back along the exact forward motion.

    frames (N, F, 3, H, W) in [0, 1]; flow (N, F-1, H, W, 2) in pixels; pixels whose motion leaves the image or
    lands on another object (occlusion) are left out.
    """
    h, w = frames.shape[-2:]
    fl = torch.from_numpy(flow).float()  # (N, F-1, H, W, 2)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    tx, ty = xs + fl[..., 0], ys + fl[..., 1]  # (N, F-1, H, W) pixel coordinates in frame t+1
    grid = torch.stack([(tx + 0.5) / w * 2 - 1, (ty + 0.5) / h * 2 - 1], dim=-1).flatten(0, 1)  # (N*(F-1), H, W, 2)
    nxt = frames[:, 1:].flatten(0, 1)  # (N*(F-1), 3, H, W)
    warped = F.grid_sample(nxt, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inst = torch.from_numpy(instances.astype(np.float32))  # (N, F, H, W)
    inst_next = F.grid_sample(inst[:, 1:].flatten(0, 1)[:, None], grid, mode="nearest", align_corners=False)[:, 0]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    valid = inside.flatten(0, 1) & (inst_next == inst[:, :-1].flatten(0, 1))  # (N*(F-1), H, W)
    err = (warped - frames[:, :-1].flatten(0, 1)).pow(2).mean(dim=1)  # (N*(F-1), H, W)
    return float(err[valid].mean())


def consistency(frames: torch.Tensor, flow: np.ndarray, instances: np.ndarray) -> dict[str, float]:
    """Temporal consistency of decoded clips (N, F, 3, H, W) in [0, 1]: lower is steadier."""
    return {
        "frame_diff": float((frames[:, 1:] - frames[:, :-1]).pow(2).mean()),
        "warp_error": warp_error(frames, flow, instances),
    }


@torch.no_grad()
def evaluate(
    model: VideoMMDiT,
    autoencoder,
    content: Content,
    pool: ClipPool,
    rgb: np.ndarray,
    temporal_guidances: tuple[float, ...] = (0.0, 1.0, 2.0),
    guidance: float = 4.0,
    steps: int = 20,
    structure_level: float = 0.0,
    seed: int = 0,
) -> dict:
    """Sample every clip of `pool` (same noise for every omega_t) and measure consistency of the decoded frames."""
    n, f = pool.latents.shape[:2]
    cond = content.text(torch.arange(n))  # `content` holds the pool's captions
    level = torch.full((n,), structure_level)
    structure = degrade_structure(pool.structure, level)
    predict = branch_predictor(model, cond, content.null, structure, level)
    noise = initial_noise(pool.latents.shape, seed)
    truth = torch.from_numpy(rgb).permute(0, 1, 4, 2, 3).float() / 255  # (N, F, 3, H, W)
    results = {"ground_truth": consistency(truth, pool.flow, pool.instances)}
    for w in temporal_guidances:
        t0 = time.perf_counter()
        z = sample_video(predict, noise, video_schedule(steps), guidance=guidance, temporal_guidance=w)
        frames = (autoencoder.decode(z.flatten(0, 1)).clamp(-1, 1) + 1) / 2  # (N*F, 3, H, W)
        frames = frames.unflatten(0, (n, f))
        row = consistency(frames, pool.flow, pool.instances)
        row["mse_to_input"] = float((frames - truth).pow(2).mean())
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results[f"omega_t={w:g}"] = row
        print(json.dumps({f"omega_t={w:g}": row}), flush=True)
    return results


def write_card(out: Path, ema: VideoMMDiT, cfg: VideoTrainConfig, command: str, extra: dict) -> Path:
    """Save the EMA weights as `out/video_mmdit.safetensors` with a model card `out/README.md`."""
    from kinema.train.card import write_model_card

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    card = {"config": dataclasses.asdict(cfg), "steps_done": log[-1]["step"], "clips_seen": log[-1]["clips"],
            "images_seen": log[-1]["images"], "train_seconds": log[-1]["seconds"],
            "final_clip_loss": log[-1]["clip_loss"], "final_image_loss": log[-1]["image_loss"],
            "seed": cfg.seed, "data": f"synthetic world train split: clips {CLIP_START}..{CLIP_START + cfg.clips - 1} "
            f"({cfg.frames} frames), images {IMAGE_START}..{IMAGE_START + cfg.images - 1}; structure = exact depth",
            "params": dataclasses.asdict(ema.params), **extra}  # fmt: skip
    path = out / "video_mmdit.safetensors"
    save_checkpoint(path, ema.state_dict(), ema.params, {"card": card})
    write_model_card(out, "video denoiser: VideoMMDiT (Gen-1 temporal layers + depth structure), EMA weights",
                     command, card)  # fmt: skip
    return path


def export(out: Path, models_dir: Path, name: str = "video_denoiser") -> Path:
    """Copy the run's weights and model card into the model repository: `<models>/<name>/1/video_mmdit.safetensors`
    and `<models>/<name>/README.md` (the Triton config beside them is kept; `python -m kinema.inference.model_config
    --sync` records the new weights' hash in it)."""
    import shutil

    target = models_dir / name / "1" / "video_mmdit.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(out / "video_mmdit.safetensors", tmp)
    tmp.replace(target)
    shutil.copyfile(out / "README.md", models_dir / name / "README.md")
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = VideoTrainConfig()
    for name in ("steps", "frames", "clips", "images", "clip_batch", "image_batch", "seed", "temporal_every"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("lr", "image_lr", "reference_prob", "text_dropout", "ema_decay"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    ap.add_argument("--preset", default=d.preset, choices=sorted(IMAGE_PRESETS), help="image preset without --init")
    ap.add_argument("--models", type=Path, default=Path("models"), help="model repository with the autoencoder")
    ap.add_argument("--init", type=Path, default=Path("models/denoiser/1/mmdit.safetensors"),
                    help="image MMDiT weights to start from ('none' for a fresh network)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("runs/video"))
    ap.add_argument("--export", type=Path, default=None, help="models/ folder to write the shipped weights into")
    ap.add_argument("--eval-clips", type=int, default=8, help="held-out clips sampled for the consistency check")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--eval-omega-t", default="0,0.5,1,2", help="comma-separated temporal guidance weights")
    ap.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance in the evaluation")
    add_runtime_args(ap)
    args = ap.parse_args(argv)
    device = resolve_device(args)
    cfg = VideoTrainConfig(
        **{k: getattr(args, k) for k in ("steps", "frames", "clips", "images", "clip_batch", "image_batch", "seed",
                                         "temporal_every", "lr", "image_lr", "reference_prob", "text_dropout",
                                         "ema_decay", "preset")},
        checkpoint_every=args.checkpoint_every or d.checkpoint_every,
    )  # fmt: skip
    init = None if str(args.init) == "none" else args.init
    _, ema = train(cfg, args.out, args.models, init, device, args.max_seconds)

    from kinema.repository import load_autoencoder, load_text_encoder_default

    autoencoder, _ = load_autoencoder(args.models)
    pool = clip_pool(World(), "val", 0, args.eval_clips, cfg.frames, autoencoder, autoencoder_tag(args.models))
    rgb = cached_clips(World(), "val", 0, args.eval_clips, cfg.frames)["rgb"]
    content = Content(load_text_encoder_default(), pool.captions, torch.device("cpu"))
    ema.eval()
    extra = {"validation_loss": validation_loss(ema, pool, content)}
    print(json.dumps(extra), flush=True)
    omegas = tuple(float(w) for w in args.eval_omega_t.split(","))
    extra["consistency"] = evaluate(ema, autoencoder, content, pool, rgb, omegas, args.guidance, args.eval_steps)
    (args.out / "eval.json").write_text(json.dumps(extra, indent=2))
    import shlex
    import sys

    command = "python -m kinema.train.video " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"wrote {write_card(args.out, ema, cfg, command, extra)}", flush=True)
    if args.export:
        print(f"exported {export(args.out, args.export)}", flush=True)


if __name__ == "__main__":
    main()
