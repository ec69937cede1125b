"""Train the vector autoencoder (`kinema.nn.vector_ae`) on single-object renders: the IINs' representation.

    python -m kinema.train.vector_ae --steps 2500 --threads 1 --out runs/vector_ae --export models \
        --results bench/results/vector_ae.json

Loss: L1 on pixels, weighted 1 + `object_weight` on the object and a pixel around it (the instance mask, dilated),
so that the few pixels that tell a cube from a cone count as much as the floor; binary cross-entropy of the
decoder's silhouette channel against the render's object mask (`mask_weight`: the outline is what tells the shapes
apart); a small L2 on the code keeps its scale near 1, and Gaussian noise on the code while training gives the
decoder a neighbourhood of each code to decode (edits move codes off the training points).

Metrics on test renders: reconstruction error; how well each factor (colour, shape, position, size) reads linearly
from the code; and what the attribute probe reads on decoded reconstructions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kinema.train.iin import CACHE, render_single_objects

FOLDER = "vector_ae"  # the Triton models are vector_ae_encoder / vector_ae_decoder


@dataclass(frozen=True)
class VectorAETrainConfig:
    samples: int = 24000  # single-object training renders
    dim: int = 64
    batch: int = 64
    lr: float = 1e-3
    steps: int = 2500
    object_weight: float = 9.0
    mask_weight: float = 1.0
    code_l2: float = 1e-2
    code_noise: float = 0.1
    # 0: every object pixel weighs 1 + object_weight; p > 0: an image's object pixels weigh that times
    # (batch mean object area / its object's area) ** p (within 1/4..8), so a small object's outline counts as much
    # as a large one's (p = 1: each object's total weight alike); the silhouette term is weighted alike.
    size_balance: float = 0.0
    seed: int = 0
    checkpoint_every: int = 250


def renders(split: str, count: int, cache: Path = CACHE) -> dict[str, torch.Tensor]:
    """Images (N, 64, 64, 3) uint8, object masks (N, 64, 64) uint8 and labels of `count` single-object scenes."""
    path = cache / f"vector-ae-{split}-{count}-v1.safetensors"
    if not path.exists():
        t0 = time.perf_counter()
        raw = render_single_objects(split, 0, count, masks=True)
        tensors = {k: torch.as_tensor(np.asarray(raw[k])) for k in ("images", "masks", "colour", "shape", "size", "u")}
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)
        print(f"rendered {count} {split} scenes in {time.perf_counter() - t0:.0f}s", flush=True)
    return load_file(str(path))


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def batch_loss(model, cfg: VectorAETrainConfig, images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator):
    x = as_input(images)
    region = F.max_pool2d(masks[:, None].float(), 3, 1, 1)  # (B, 1, H, W): the object and a pixel around it
    balance = torch.ones(len(x), 1, 1, 1)
    if cfg.size_balance:
        area = region.sum((1, 2, 3), keepdim=True).clamp_min(1.0)
        balance = (area.mean() / area).pow(cfg.size_balance).clamp(0.25, 8.0)
    weight = 1.0 + cfg.object_weight * balance * region
    code = model.encode(x)
    out = model.decode_all(code + cfg.code_noise * torch.randn(code.shape, generator=gen))
    pixels = (weight * (out[:, :3] - x).abs()).mean()
    silhouette = F.binary_cross_entropy_with_logits(
        out[:, 3], masks.float(), weight=(1.0 + (balance - 1.0) * region)[:, 0]
    )
    prior = code.pow(2).mean()
    loss = pixels + cfg.mask_weight * silhouette + cfg.code_l2 * prior
    return loss, {"pixels": pixels.item(), "silhouette": silhouette.item(), "code_sq": prior.item()}


def train(cfg: VectorAETrainConfig, out: Path, max_seconds: float | None = None, cache: Path = CACHE):
    """Train or resume (out/state.safetensors); returns the model in eval mode."""
    from kinema.nn.vector_ae import VectorAutoencoder, VectorAutoencoderParams
    from kinema.train.state import load_train_state, save_train_state

    torch.manual_seed(cfg.seed)
    data = renders("train", cfg.samples, cache)
    model = VectorAutoencoder(VectorAutoencoderParams(dim=cfg.dim))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    out.mkdir(parents=True, exist_ok=True)
    state_path, log = out / "state.safetensors", out / "log.jsonl"
    counters = {"step": 0, "samples": 0, "seconds": 0.0}
    if state_path.exists():
        counters = load_train_state(state_path, model, opt)
        print(f"resumed at step {counters['step']}", flush=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + counters["step"])
    print(f"vector autoencoder: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    model.train()
    t0, start = time.perf_counter() - counters["seconds"], counters["seconds"]
    while counters["step"] < cfg.steps and not (max_seconds and counters["seconds"] - start >= max_seconds):
        progress = counters["step"] / cfg.steps  # warm up over 5%, then cosine to zero
        lr = cfg.lr * min(1.0, (counters["step"] + 1) / (0.05 * cfg.steps)) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, cfg.samples, (cfg.batch,), generator=gen)
        loss, logged = batch_loss(model, cfg, data["images"][idx], data["masks"][idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        counters["step"] += 1
        counters["samples"] += cfg.batch
        counters["seconds"] = time.perf_counter() - t0
        last = counters["step"] == cfg.steps or bool(max_seconds and counters["seconds"] - start >= max_seconds)
        if counters["step"] % 50 == 0 or counters["step"] == 1 or last:  # the log ends where the run ends
            row = {**counters, "lr": round(lr, 6), **{k: round(v, 5) for k, v in logged.items()}}
            print(json.dumps(row), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if counters["step"] % cfg.checkpoint_every == 0:
            save_train_state(state_path, model, opt, counters)
    save_train_state(state_path, model, opt, counters)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(model, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model.encode(as_input(images[i : i + batch])) for i in range(0, len(images), batch)])


@torch.no_grad()
def evaluate(model, train_data: dict, test: dict, n_probe_train: int = 6000, n_decoded: int = 500) -> dict:
    """Reconstruction error, linear-probe accuracy of each factor from the code, the probe on reconstructions."""
    from kinema.eval.iin import linear_probe_accuracy, read_images
    from kinema.eval.probe import Probe
    from kinema.train.autoencoder import to_uint8

    edges = torch.quantile(train_data["u"].float(), torch.tensor([1 / 3, 2 / 3]))
    z_train = encode_all(model, train_data["images"][:n_probe_train])
    z_test = encode_all(model, test["images"])

    def labels(d: dict, n: int | None = None) -> dict[str, torch.Tensor]:
        u = d["u"].float()[:n]
        return {"colour": d["colour"][:n], "shape": d["shape"][:n], "position": torch.bucketize(u, edges),
                "size": d["size"][:n]}  # fmt: skip

    y_train, y_test = labels(train_data, n_probe_train), labels(test)
    probe_acc = {f: round(linear_probe_accuracy(z_train, y_train[f], z_test, y_test[f]), 4) for f in y_train}
    n = min(n_decoded, len(z_test))
    recon = torch.cat([model.decode(z) for z in z_test[:n].split(256)])
    target = as_input(test["images"][:n])
    mse = float((recon.clamp(-1, 1) - target).pow(2).mean())
    read = read_images(Probe.from_file(), to_uint8(recon), edges)
    agree = {f: round(float(np.mean(read[f] == y_test[f][:n].numpy())), 4) for f in ("colour", "shape", "position")}
    small = y_test["size"][:n].numpy() == 0  # SIZES order: small first
    agree["shape_small"] = round(float(np.mean(read["shape"][small] == y_test["shape"][:n].numpy()[small])), 4)
    agree["shape_large"] = round(float(np.mean(read["shape"][~small] == y_test["shape"][:n].numpy()[~small])), 4)
    return {
        "n_test": len(z_test),
        "reconstruction_mse": round(mse, 5),
        "reconstruction_psnr_db": round(10 * math.log10(4.0 / mse), 2),  # images span [-1, 1]
        "linear_probe_from_code": probe_acc,
        "probe_on_reconstructions": {"n": n, **agree},
        "position_edges_u": [round(e, 4) for e in edges.tolist()],
    }


HALVES: dict[str, tuple[str, ...]] = {"encoder": ("encoder.", "to_code."), "decoder": ("from_code.", "decoder.")}


def half_path(models_dir: Path, half: str) -> Path:
    """Where the Triton model `vector_ae_<half>` keeps its weights under `models_dir`."""
    return Path(models_dir) / f"{FOLDER}_{half}" / "1" / f"{half}.safetensors"


def export(model, models_dir: Path, card: dict, command: str) -> list[Path]:
    """The two Triton models `vector_ae_encoder` / `vector_ae_decoder` under `models_dir`: each half's weights
    (`1/<half>.safetensors`, params and card in the metadata), its config.pbtxt and its model card."""
    from kinema.inference.triton_python import write_model_py
    from kinema.nn.checkpoint import save_checkpoint, sha256_file
    from kinema.train.card import write_model_card

    state, paths = model.state_dict(), []
    for half, prefixes in HALVES.items():
        path = half_path(models_dir, half)
        folder = path.parent.parent
        save_checkpoint(path, {k: v for k, v in state.items() if k.startswith(prefixes)}, model.params, {"card": card})
        sha = sha256_file(path)
        what = "image -> code" if half == "encoder" else "code -> image"
        write_model_card(folder, f"{folder.name}: vector autoencoder {half} ({what}, {model.params.dim}-d code)",
                         command, {**card, "weights_sha256": sha})  # fmt: skip
        (folder / "config.pbtxt").write_text(_config(folder.name, half, model.params, sha), encoding="utf-8")
        write_model_py(folder, folder.name)
        paths.append(path)
    return paths


def _config(name: str, half: str, params, sha: str) -> str:
    from dataclasses import asdict

    s, d = params.image_size, params.dim
    image = f'{{ name: "IMAGE" data_type: TYPE_FP32 dims: [ 3, {s}, {s} ] }}'
    code = f'{{ name: "LATENT" data_type: TYPE_FP32 dims: [ {d} ] }}'
    inputs, outputs = (image, code) if half == "encoder" else (code, image)
    what = "images (3, S, S) in [-1, 1] -> codes" if half == "encoder" else "codes -> images (3, S, S), unclamped"
    return f"""# Vector autoencoder {half} (kinema.nn.vector_ae): {what}; the representation IINs interpret.
name: "{name}"
backend: "python"
max_batch_size: 32
input [
  {inputs}
]
output [
  {outputs}
]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "weights" value {{ string_value: "{half}.safetensors" }} }}
parameters {{ key: "torch_threads" value {{ string_value: "1" }} }}
parameters {{ key: "weights_sha256" value {{ string_value: "{sha}" }} }}
# The params (image_size, dim) for the interpret service, which Triton's model metadata has no room for.
parameters {{ key: "params_json" value {{ string_value: {json.dumps(json.dumps(asdict(params), sort_keys=True))} }} }}
"""


def load_half(path: Path, half: str):
    """(`VectorAutoencoder` with `half`'s weights loaded, the file's sha256); safetensors only."""
    from kinema.errors import Unavailable
    from kinema.nn.checkpoint import read_metadata, sha256_file
    from kinema.nn.vector_ae import VectorAutoencoder, VectorAutoencoderParams

    if not Path(path).is_file():
        raise Unavailable(f"missing weights {path}")
    raw = read_metadata(path)["params"]
    model = VectorAutoencoder(VectorAutoencoderParams(**{k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in raw.items()}))  # fmt: skip
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or any(k.startswith(HALVES[half]) for k in missing):
        raise Unavailable(f"{path} does not hold the vector autoencoder's {half} weights")
    return model.eval().requires_grad_(False), sha256_file(path)


def load_vector_autoencoder(models_dir: Path):
    """The shipped `VectorAutoencoder` (both halves) in eval mode."""
    folder = Path(models_dir)
    paths = {half: half_path(folder, half) for half in HALVES}
    if not all(p.is_file() for p in paths.values()):
        raise FileNotFoundError(
            f"no vector autoencoder under {folder} ({FOLDER}_encoder/, {FOLDER}_decoder/); train one with "
            "`python -m kinema.train.vector_ae --export models`"
        )
    model, _ = load_half(paths["encoder"], "encoder")
    decoder, _ = load_half(paths["decoder"], "decoder")
    model.load_state_dict({k: v for k, v in decoder.state_dict().items() if k.startswith(HALVES["decoder"])},
                          strict=False)  # fmt: skip
    return model


def main(argv: list[str] | None = None) -> None:
    import shlex
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(VectorAETrainConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--eval-n", type=int, default=1000, help="test renders for the metrics")
    ap.add_argument("--out", type=Path, default=Path("runs/vector_ae"), help="run folder (state.safetensors resumes)")
    ap.add_argument("--export", type=Path, default=None, help="models/ folder to write the two Triton models into")
    ap.add_argument("--results", type=Path, default=None, help="JSON file to write the metrics into")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default; 1 when cores are shared)")
    ap.add_argument("--max-seconds", type=float, default=None, help="end the run after this much training time")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VectorAETrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(VectorAETrainConfig)})
    model = train(cfg, args.out, args.max_seconds)
    metrics = evaluate(model, renders("train", cfg.samples), renders("test", args.eval_n))
    log = [json.loads(line) for line in (args.out / "log.jsonl").read_text().splitlines()]
    card = {
        "config": dataclasses.asdict(cfg),
        "steps_done": log[-1]["step"],
        "train_seconds": round(log[-1]["seconds"], 1),
        "final_train_loss": {k: log[-1][k] for k in ("pixels", "silhouette", "code_sq")},
        "seed": cfg.seed,
        "data": f"world train split, single-object scenes 0..{cfg.samples - 1}; metrics on test split scenes "
        f"0..{args.eval_n - 1}",
        "params": dataclasses.asdict(model.params),
        "metrics": metrics,
    }
    print(json.dumps(metrics, indent=2), flush=True)
    command = "python -m kinema.train.vector_ae " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"command": command, **card}, indent=2))
    if args.export:
        for path in export(model, args.export, card, command):
            print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
