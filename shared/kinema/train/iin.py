"""Train invertible interpretation networks over the shipped autoencoder's latent space.

    python -m kinema.train.iin --kind factor --steps 3000 --out runs/iin_factor --export models

Three kinds, one data set of single-object world renders with exact labels (colour, shape,
size, image position) and captions:

- `mle`: unsupervised maximum likelihood, z = T(x) ~ N(0, I);
- `factor`: the disentangling IIN (Esser, Rombach & Ommer 2020): z splits into a residual and
  one block per factor; pairs sharing a factor are correlated with rho in that block;
- `invariance`: a conditional INN x <-> z given the attribute probe's representation of the
  image (Rombach, Esser & Ommer 2020, "Making Sense of CNNs"): sampling z shows what that
  representation does not encode;
- `net2net`: a conditional INN MiniLM sentence embedding -> latent (Rombach, Esser & Ommer 2020,
  "Network-to-Network Translation"): text to image without a diffusion model.

The IIN works on the top principal components of the normalised latent (whitened, `LatentBasis`);
the orthogonal rest of a latent passes through an edit unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kinema.data import World
from kinema.data.scene import COLOUR_NAMES, SHAPES, SIZES

CACHE = Path(".cache/kinema")
POSITION_BINS = 3  # left / centre / right thirds of the visible range, for probes and edits
PAIR_POSITION_WINDOW = 0.04  # two renders "share" the position factor when their centres are this close (u)


@dataclass
class FactorData:
    """Single-object renders with exact factor labels, their latents and caption embeddings."""

    images: torch.Tensor  # (N, H, W, 3) uint8
    latents: torch.Tensor  # (N, C, h, w) normalised autoencoder latents
    colour: torch.Tensor  # (N,) index into COLOUR_NAMES
    shape: torch.Tensor  # (N,) index into SHAPES
    size: torch.Tensor  # (N,) index into SIZES
    u: torch.Tensor  # (N,) projected object centre, 0 = left edge, 1 = right edge
    captions: list[str]

    def __len__(self) -> int:
        return len(self.latents)

    def subset(self, idx: torch.Tensor) -> FactorData:
        return FactorData(
            self.images[idx],
            self.latents[idx],
            self.colour[idx],
            self.shape[idx],
            self.size[idx],
            self.u[idx],
            [self.captions[i] for i in idx.tolist()],
        )


def render_single_objects(split: str, start: int, count: int, masks: bool = False) -> dict:
    """`count` single-object scenes of `split` (indices start.. ) with labels (and object masks); deterministic."""
    world = World()
    images = np.empty((count, 64, 64, 3), np.uint8)
    mask = np.empty((count, 64, 64), np.uint8) if masks else None
    colour, shape, size, u, captions = [], [], [], [], []
    for i in range(count):
        s = world.sample_from_scene(world.scene(split, start + i, n_objects=1))
        images[i] = np.round(s.rgb * 255).astype(np.uint8)
        if mask is not None:
            mask[i] = s.instances > 0
        o = s.objects[0]
        colour.append(COLOUR_NAMES.index(o.colour))
        shape.append(SHAPES.index(o.shape))
        size.append(list(SIZES).index(o.size))
        u.append(o.image_position[0])
        captions.append(s.caption)
    out = {"images": images, "colour": colour, "shape": shape, "size": size, "u": u, "captions": captions}
    return out if mask is None else out | {"masks": mask}


def _private_tmp(path: Path) -> Path:
    """A temporary name beside `path` that no other process or thread writes to (then replaced onto `path`)."""
    import os
    import threading

    return path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")


REPRESENTATIONS: tuple[str, ...] = ("vae", "vector_ae")  # what an IIN interprets: an autoencoder's code of the image


def representation_fingerprint(representation: str, models_dir: Path) -> str:
    """A short hash of the representation's encoder weights: cached codes are keyed by it."""
    from kinema.nn.checkpoint import sha256_file
    from kinema.repository import AUTOENCODER_FILES
    from kinema.train.vector_ae import half_path

    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}; expected one of {REPRESENTATIONS}")
    path = models_dir / AUTOENCODER_FILES[0] if representation == "vae" else half_path(models_dir, "encoder")
    return sha256_file(path)[:12]


def load_representation(representation: str, models_dir: Path):
    """The autoencoder whose code an IIN interprets: `encode(images in [-1, 1])` and `decode(codes)`.

    `vae`: the LDM autoencoder, normalised (4, 16, 16) latents; `vector_ae`: `kinema.nn.vector_ae`, (dim,) codes.
    """
    if representation == "vae":
        from kinema.repository import load_autoencoder

        return load_autoencoder(models_dir)[0]
    if representation == "vector_ae":
        from kinema.train.vector_ae import load_vector_autoencoder

        return load_vector_autoencoder(models_dir)
    raise ValueError(f"unknown representation {representation!r}; expected one of {REPRESENTATIONS}")


@torch.no_grad()
def factor_data(
    split: str, count: int, models_dir: Path, cache: Path = CACHE, representation: str = "vae"
) -> FactorData:
    """Renders, labels and codes (`FactorData.latents`) of `count` single-object scenes, computed once and cached."""
    from kinema.train.autoencoder import to_tensor

    enc_sha = representation_fingerprint(representation, models_dir)
    key = hashlib.sha256(json.dumps(["iin-single-v1", split, count, enc_sha]).encode()).hexdigest()[:16]
    path = cache / f"iin-{split}-{count}-{key}.safetensors"
    if not path.exists():
        t0 = time.perf_counter()
        raw = render_single_objects(split, 0, count)
        autoencoder = load_representation(representation, models_dir)
        images = raw.pop("images")
        latents = torch.cat([autoencoder.encode(to_tensor(images[i : i + 64])) for i in range(0, count, 64)])
        tensors = {
            "images": torch.from_numpy(images),
            "latents": latents.contiguous(),
            **{k: torch.tensor(raw[k]) for k in ("colour", "shape", "size", "u")},
        }
        cache.mkdir(parents=True, exist_ok=True)
        tmp = _private_tmp(path)  # two fitting jobs may render the same data at once: each writes its own, whole
        save_file(tensors, str(tmp), metadata={"captions": json.dumps(raw["captions"])})
        tmp.replace(path)
        print(f"rendered and encoded {count} {split} scenes in {time.perf_counter() - t0:.0f}s", flush=True)
    from safetensors import safe_open

    t = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        captions = json.loads(f.metadata()["captions"])
    return FactorData(t["images"], t["latents"], t["colour"], t["shape"], t["size"], t["u"].float(), captions)


FACTORS: tuple[str, ...] = ("colour", "shape", "position", "size")
KINDS: tuple[str, ...] = ("mle", "factor", "invariance", "net2net")
POSITION_NAMES: tuple[str, ...] = ("left", "centre", "right")


def factor_labels(data: FactorData, edges: torch.Tensor) -> dict[str, torch.Tensor]:
    """Discrete labels per factor; position in coarse bins (left / centre / right) split at `edges`."""
    return {"colour": data.colour, "shape": data.shape, "position": torch.bucketize(data.u, edges), "size": data.size}


FACTOR_VALUES: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "position": POSITION_NAMES,
    "size": tuple(SIZES),
}


class PairSampler:
    """Index pairs (a, b) of renders that share one factor (IIN's training pairs, Esser et al. 2020 sec. 3.2).

    Discrete factors share their exact value; position is shared when the centres lie close
    (partners are drawn among neighbours in u order, about `PAIR_POSITION_WINDOW` wide).
    """

    def __init__(self, data: FactorData, factors: tuple[str, ...] = FACTORS) -> None:
        self.factors = factors
        self.n = len(data)
        labels = {"colour": data.colour, "shape": data.shape, "size": data.size}
        self.groups = {
            name: [torch.nonzero(labels[name] == v).flatten() for v in torch.unique(labels[name])]
            for name in factors
            if name != "position"
        }
        self.group_of = {}
        for name, groups in self.groups.items():
            self.group_of[name] = torch.empty(self.n, dtype=torch.long)
            for g, idx in enumerate(groups):
                self.group_of[name][idx] = g
        self.u_order = torch.argsort(data.u)
        self.u_rank = torch.argsort(self.u_order)
        sorted_u = data.u[self.u_order]
        ahead = torch.searchsorted(sorted_u, sorted_u + PAIR_POSITION_WINDOW / 2) - torch.arange(self.n)
        self.window = max(1, int(ahead.float().median()))  # ranks within half the window, either side

    def sample(
        self, batch: int, gen: torch.Generator, only: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a (B,), b (B,), shared factor index (B,) into `self.factors`); `only` fixes the factor."""
        if only is None:
            which = torch.randint(0, len(self.factors), (batch,), generator=gen)
        else:
            which = torch.full((batch,), self.factors.index(only))
        a = torch.randint(0, self.n, (batch,), generator=gen)
        b = torch.empty_like(a)
        for k, name in enumerate(self.factors):
            sel = torch.nonzero(which == k).flatten()
            if not len(sel):
                continue
            if name == "position":
                offset = torch.randint(-self.window, self.window + 1, (len(sel),), generator=gen)
                b[sel] = self.u_order[(self.u_rank[a[sel]] + offset).clamp(0, self.n - 1)]
                continue
            groups, group_of = self.groups[name], self.group_of[name][a[sel]]
            r = torch.rand(len(sel), generator=gen)
            for g, idx in enumerate(groups):
                m = group_of == g
                b[sel[m]] = idx[(r[m] * len(idx)).long().clamp(max=len(idx) - 1)]
        return a, b, which


def factor_pair_nll(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logdet_a: torch.Tensor,
    logdet_b: torch.Tensor,
    shared: torch.Tensor,
    rho: float,
) -> torch.Tensor:
    """-log p(x_a, x_b) per dimension, (B,), for pairs sharing the dims marked in `shared` (B, D) bool.

    IIN's factor loss (Esser, Rombach & Ommer 2020, sec. 3.2): in the shared factor's block,
    (z_a, z_b) is a standard bivariate normal with correlation rho per dimension; every other
    dimension is N(0, 1) and independent. Each image adds its flow's log-determinant.
    """
    d = z_a.shape[1]
    indep = 0.5 * (z_a.pow(2) + z_b.pow(2))
    corr = (z_a.pow(2) + z_b.pow(2) - 2 * rho * z_a * z_b) / (2 * (1 - rho**2)) + 0.5 * math.log(1 - rho**2)
    energy = torch.where(shared, corr, indep).sum(1) + d * math.log(2 * math.pi)
    return (energy - logdet_a - logdet_b) / (2 * d)


@torch.no_grad()
def estimate_factor_dims(
    x: torch.Tensor, sampler: PairSampler, pairs: int = 20000, seed: int = 0
) -> tuple[dict[str, float], dict[str, int]]:
    """IIN's dimension estimate (Esser et al. 2020, sec. 3.3): ({factor: s_F}, {factor: N_F}).

    s_F = sum_i Corr(x^a_i, x^b_i) over pairs sharing F, on the representation x (N dims); the
    residual scores s_0 = N, and N_F = floor(N s_F / sum_{F'} s_{F'}); every factor keeps one at least.
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[1]
    scores = {}
    for name in sampler.factors:
        a, b, _ = sampler.sample(pairs, gen, only=name)
        xa, xb = x[a] - x[a].mean(0), x[b] - x[b].mean(0)
        corr = (xa * xb).sum(0) / (xa.norm(dim=0) * xb.norm(dim=0) + 1e-12)  # (N,)
        scores[name] = float(corr.sum())
    total = n + sum(scores.values())
    return scores, {name: max(1, int(n * s / total)) for name, s in scores.items()}


@torch.no_grad()
def probe_features(images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(N, 6 + hidden) what the attribute probe knows of each image's largest object.

    The segment's palette colour (one-hot) and the shape classifier's hidden layer on the
    normalised crop: by construction blind to position, scale and background, which is what
    the invariance model should recover.
    """
    from kinema.eval.probe import PALETTE, Probe, crops, segment

    probe = Probe.from_file()
    net = probe.net
    hidden = net.head[:3]  # Flatten, Linear, ReLU
    out = []
    for i in range(0, len(images), batch):
        ims = list(images[i : i + batch].numpy())
        segs = [max(segment(im, probe.params), key=lambda s: s.area, default=None) for im in ims]
        feats = torch.zeros(len(ims), len(PALETTE) + net.params.hidden)
        found = [k for k, s in enumerate(segs) if s is not None]
        if found:
            x = torch.cat([crops(ims[k], [segs[k]], net.params.crop) for k in found])
            feats[found, len(PALETTE) :] = hidden(net.features(x))
            feats[found, [PALETTE.index(segs[k].colour) for k in found]] = 1.0
        out.append(feats)
    return torch.cat(out)


@torch.no_grad()
def caption_embeddings(captions: list[str]) -> torch.Tensor:
    """(N, 384) MiniLM pooled sentence embeddings, one per caption (unique captions encoded once)."""
    from kinema.repository import load_text_encoder_default

    unique = sorted(set(captions))
    encoder = load_text_encoder_default()
    pooled = torch.cat([encoder.encode(unique[i : i + 256]).pooled.float() for i in range(0, len(unique), 256)])
    lookup = {c: i for i, c in enumerate(unique)}
    return pooled[[lookup[c] for c in captions]]


def conditions(kind: str, data: FactorData, cache: Path = CACHE) -> torch.Tensor | None:
    """The source representation a conditional kind is given, cached beside the data."""
    if kind not in ("invariance", "net2net"):
        return None
    key = hashlib.sha256(json.dumps([kind, data.captions, data.latents[:4].sum().item()]).encode()).hexdigest()[:16]
    path = cache / f"iin-cond-{kind}-{len(data)}-{key}.safetensors"
    if not path.exists():
        cond = probe_features(data.images) if kind == "invariance" else caption_embeddings(data.captions)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = _private_tmp(path)
        save_file({"cond": cond.contiguous()}, str(tmp))
        tmp.replace(path)
    return load_file(str(path))["cond"]


@dataclass(frozen=True)
class IINTrainConfig:
    kind: str = "factor"
    representation: str = "vae"  # REPRESENTATIONS: whose code of the image the IIN interprets
    samples: int = 8000  # single-object training renders
    components: int = 128  # principal components of the latent the flow sees
    blocks: int = 8
    hidden: int = 128
    depth: int = 2
    mixing: str = "lu"
    batch: int = 256  # images (mle, conditional) or pairs (factor)
    lr: float = 1e-3
    warmup: int = 100
    steps: int = 3000
    rho: float = 0.9  # correlation of a shared factor in z (factor kind)
    factor_dims: tuple[int, ...] = ()  # per FACTORS; empty: the paper's estimate
    noise: float = 0.02  # Gaussian noise on x while training (whitened units): a smoother density
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {KINDS}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"unknown representation {self.representation!r}; expected one of {REPRESENTATIONS}")
        if self.factor_dims and len(self.factor_dims) != len(FACTORS):
            raise ValueError(f"factor_dims needs one entry per factor {FACTORS}, got {self.factor_dims}")
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"rho must lie in (0, 1), got {self.rho}")


def build_model(cfg: IINTrainConfig, data: FactorData, cond: torch.Tensor | None) -> tuple:
    """(model with its basis fitted and condition statistics set, position edges, dimension estimate or None)."""
    from kinema.nn.iin import InterpretationNet, InterpretationParams, LatentBasis

    edges = torch.quantile(data.u, torch.tensor([1 / 3, 2 / 3]))
    basis = LatentBasis(tuple(data.latents.shape[1:]), cfg.components)
    basis.fit(data.latents)
    estimate = None
    names: tuple[str, ...] = ()
    dims: tuple[int, ...] = ()
    if cfg.kind == "factor":
        x, _ = basis.project(data.latents)
        scores, est = estimate_factor_dims(x, PairSampler(data), seed=cfg.seed)
        estimate = {"scores": scores, "dims": est}
        names, dims = FACTORS, cfg.factor_dims or tuple(est[f] for f in FACTORS)
    params = InterpretationParams(
        latent_shape=tuple(data.latents.shape[1:]),
        components=cfg.components,
        blocks=cfg.blocks,
        hidden=cfg.hidden,
        depth=cfg.depth,
        mixing=cfg.mixing,
        cond_dim=0 if cond is None else cond.shape[1],
        factor_names=names,
        factor_dims=dims,
        factor_values=tuple(FACTOR_VALUES[n] for n in names),
        seed=cfg.seed,
        representation=cfg.representation,
    )
    model = InterpretationNet(params)
    model.basis.load_state_dict(basis.state_dict())
    if cond is not None:
        model.cond_shift.copy_(cond.mean(0))
        model.cond_scale.copy_(cond.std(0).clamp_min(1e-3))
    return model, edges, estimate


def batch_loss(
    model,
    cfg: IINTrainConfig,
    x: torch.Tensor,
    cond: torch.Tensor | None,
    sampler: PairSampler | None,
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and what to log (nats per dimension)."""
    from kinema.nn.iin import standard_normal_nll

    if cfg.kind != "factor":
        idx = torch.randint(0, len(x), (cfg.batch,), generator=gen)
        xb = x[idx] + cfg.noise * torch.randn(cfg.batch, x.shape[1], generator=gen)
        c = None if cond is None else model._cond(cond[idx])
        z, logdet = model.flow(xb, c)
        loss = standard_normal_nll(z, logdet).mean()
        return loss, {"nll": loss.item()}
    a, b, which = sampler.sample(cfg.batch, gen)
    xab = x[torch.cat([a, b])] + cfg.noise * torch.randn(2 * cfg.batch, x.shape[1], generator=gen)
    z, logdet = model.flow(xab)
    shared = torch.zeros(cfg.batch, x.shape[1], dtype=torch.bool)
    for k, name in enumerate(FACTORS):
        shared[which == k, model.layout.slice(name)] = True
    z_a, z_b = z.chunk(2)
    ld_a, ld_b = logdet.chunk(2)
    loss = factor_pair_nll(z_a, z_b, ld_a, ld_b, shared, cfg.rho).mean()
    with torch.no_grad():  # the unpaired likelihood, comparable with the mle kind
        nll = standard_normal_nll(z, logdet).mean().item()
    return loss, {"pair_nll": loss.item(), "nll": nll}


def train(
    cfg: IINTrainConfig,
    out: Path,
    models_dir: Path,
    max_seconds: float | None = None,
    cache: Path = CACHE,
    data: FactorData | None = None,
    cond: torch.Tensor | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple:
    """Train or resume; returns (model in eval mode, position edges, dimension estimate or None, data).

    `data` and `cond` replace the rendered training set and its conditions (tests pass tiny ones). `on_step(step,
    steps)` is called after every step (a fitting job records it there, and stops the run by raising).
    """
    from kinema.nn.iin import InterpretationNet, InterpretationParams
    from kinema.train.state import load_train_state, save_train_state

    torch.manual_seed(cfg.seed)
    data = data if data is not None else factor_data("train", cfg.samples, models_dir, cache, cfg.representation)
    if cond is None:
        cond = conditions(cfg.kind, data, cache)
    state_path, log, meta_path = out / "state.safetensors", out / "log.jsonl", out / "model.json"
    out.mkdir(parents=True, exist_ok=True)
    opt_args = {"lr": cfg.lr, "weight_decay": 0.0}
    counters = {"step": 0, "samples": 0, "seconds": 0.0}
    if state_path.exists():
        meta = json.loads(meta_path.read_text())
        kwargs = {
            k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in meta["params"].items()
        }
        model = InterpretationNet(InterpretationParams(**kwargs))
        edges, estimate = torch.tensor(meta["position_edges"]), meta["estimate"]
        opt = torch.optim.Adam(model.parameters(), **opt_args)
        counters = load_train_state(state_path, model, opt)
        print(f"resumed at step {counters['step']}", flush=True)
    else:
        model, edges, estimate = build_model(cfg, data, cond)
        opt = torch.optim.Adam(model.parameters(), **opt_args)
        meta = {"params": dataclasses.asdict(model.params), "position_edges": edges.tolist(), "estimate": estimate}
        meta_path.write_text(json.dumps(meta, indent=2))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if estimate is not None:
        print(f"factor dimension estimate: {json.dumps(estimate)}", flush=True)
    with torch.no_grad():
        x, _ = model.basis.project(data.latents)  # (N, k) whitened coordinates
    sampler = PairSampler(data) if cfg.kind == "factor" else None
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + counters["step"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"IIN {cfg.kind}: {n_params / 1e6:.2f}M parameters, {len(data)} training renders", flush=True)
    model.train()
    t0, start = time.perf_counter() - counters["seconds"], counters["seconds"]
    row: dict = {}
    logged: dict[str, float] = {}
    while counters["step"] < cfg.steps and not (max_seconds and counters["seconds"] - start >= max_seconds):
        for g in opt.param_groups:  # warmup, then cosine to a tenth
            progress = counters["step"] / max(1, cfg.steps)
            g["lr"] = (
                cfg.lr * min(1.0, (counters["step"] + 1) / cfg.warmup) * (0.55 + 0.45 * math.cos(math.pi * progress))
            )
        loss, logged = batch_loss(model, cfg, x, cond, sampler, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        counters["step"] += 1
        counters["samples"] += cfg.batch
        counters["seconds"] = time.perf_counter() - t0
        if counters["step"] % 50 == 0 or counters["step"] == 1:
            row = {**counters, **{k: round(v, 5) for k, v in logged.items()}}
            print(json.dumps(row), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if counters["step"] % cfg.checkpoint_every == 0:
            save_train_state(state_path, model, opt, counters)
        if on_step is not None:
            on_step(counters["step"], cfg.steps)
    if logged and row.get("step") != counters["step"]:
        row = {**counters, **{k: round(v, 5) for k, v in logged.items()}}  # the log ends where the run ended
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
    save_train_state(state_path, model, opt, counters)
    model.eval()
    return model, edges, estimate, data


@torch.no_grad()
def set_prototypes(model, data: FactorData, edges: torch.Tensor) -> None:
    """Mean z_F per value of each factor over the training renders: what `edit(..., {F: value})` sets."""
    if not model.params.factor_names:
        return
    z = torch.cat([model.encode(data.latents[i : i + 1024])[0] for i in range(0, len(data), 1024)])
    labels = factor_labels(data, edges)
    for name in model.params.factor_names:
        zf = z[:, model.layout.slice(name)]
        proto = getattr(model, f"proto_{name}")
        for v in range(len(proto)):
            proto[v] = zf[labels[name] == v].mean(0)


@torch.no_grad()
def round_to_half(model: torch.nn.Module) -> None:
    """Round every float weight and buffer to float16 precision, in place (kept as float32)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.copy_(t.half().float())


def export(model, cfg: IINTrainConfig, folder: Path, card: dict, command: str, dtype: str = "float32") -> Path:
    """Write `folder/1/iin.safetensors` (weights, params, card) and the model card.

    `dtype` float16 stores the float tensors at half size; `load_iin` reads them back into float32,
    where the flow and its inverse run (call `round_to_half` first, so metrics match the file).
    """
    from kinema.nn.checkpoint import save_checkpoint
    from kinema.train.card import write_model_card

    path = folder / "1" / "iin.safetensors"
    state = model.state_dict()
    if dtype == "float16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_checkpoint(path, state, model.params, {"card": card})
    titles = {
        "mle": "IIN (maximum likelihood) over the autoencoder latent",
        "factor": "IIN: disentangled factors (colour, shape, position, size) of the autoencoder latent",
        "invariance": "conditional INN: what the attribute probe's representation does not encode",
        "net2net": "net2net: MiniLM sentence embedding -> autoencoder latent (conditional INN)",
    }
    write_model_card(folder, f"{folder.name}: {titles[cfg.kind]}", command, card)
    if not (folder / "config.pbtxt").is_file():  # a new model; an existing config keeps its words (--sync updates it)
        from kinema.inference.model_card import write_sha256
        from kinema.inference.triton_python import write_model_py
        from kinema.nn.checkpoint import sha256_file

        sha = sha256_file(path)
        write_sha256(folder, sha)
        write_model_py(folder, "iin")
        tmp = folder / "config.pbtxt.tmp"  # last, whole: a folder with a config is complete
        tmp.write_text(iin_config(folder.name, model.params, sha), encoding="utf-8")
        tmp.replace(folder / "config.pbtxt")
    return path


def iin_config(name: str, params, sha256: str) -> str:
    """A Triton config.pbtxt for an IIN (`kinema.inference.networks.IinNetwork`) with these params and weights."""
    from dataclasses import asdict

    latent = ", ".join(map(str, params.latent_shape))
    k, n = params.components, math.prod(params.latent_shape)
    inputs = [f'{{ name: "LATENT" data_type: TYPE_FP32 dims: [ {latent} ] optional: true }}',
              f'{{ name: "Z" data_type: TYPE_FP32 dims: [ {k} ] optional: true }}',
              f'{{ name: "OUTSIDE" data_type: TYPE_FP32 dims: [ {n} ] optional: true }}']  # fmt: skip
    outputs = [f'{{ name: "Z" data_type: TYPE_FP32 dims: [ {k} ] }}',
               f'{{ name: "OUTSIDE" data_type: TYPE_FP32 dims: [ {n} ] }}']  # fmt: skip
    if params.factor_values:
        values = len(params.factor_values)
        inputs.append(f'{{ name: "VALUES" data_type: TYPE_INT32 dims: [ {values} ] optional: true }}')
        outputs.append(f'{{ name: "SCORES" data_type: TYPE_FP32 dims: [ {sum(map(len, params.factor_values))} ] }}')
    if params.cond_dim:
        inputs.append(f'{{ name: "COND" data_type: TYPE_FP32 dims: [ {params.cond_dim} ] }}')
    outputs.append(f'{{ name: "LATENT" data_type: TYPE_FP32 dims: [ {latent} ] }}')
    published = json.dumps(json.dumps(asdict(params), sort_keys=True))
    joined_in, joined_out = ",\n  ".join(inputs), ",\n  ".join(outputs)
    kind = "conditional INN" if params.cond_dim else "IIN"
    return f"""# {kind} over the `{params.representation}` code of an image (kinema.train.iin). One direction per
# request (kinema.inference.networks.IinNetwork): LATENT -> Z, OUTSIDE [, SCORES] or
# Z [+ OUTSIDE] [+ VALUES] -> LATENT. params_json publishes the params for the interpret service (Triton's model
# metadata has no room for them); the model refuses to load when they differ from the weights'.
name: "{name}"
backend: "python"
max_batch_size: 32
input [
  {joined_in}
]
output [
  {joined_out}
]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "network" value {{ string_value: "iin" }} }}
parameters {{ key: "weights" value {{ string_value: "iin.safetensors" }} }}
parameters {{ key: "torch_threads" value {{ string_value: "1" }} }}
parameters {{ key: "weights_sha256" value {{ string_value: "{sha256}" }} }}
parameters {{ key: "params_json" value {{ string_value: {published} }} }}
"""


def load_iin(path: Path):
    """An `InterpretationNet` in eval mode from a safetensors checkpoint written by `export`."""
    from kinema.nn.checkpoint import read_metadata
    from kinema.nn.iin import InterpretationNet, InterpretationParams

    raw = read_metadata(path)["params"]
    kwargs = {
        k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        for k, v in raw.items()
    }
    model = InterpretationNet(InterpretationParams(**kwargs))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return model.eval().requires_grad_(False)


def run_card(
    cfg: IINTrainConfig, out: Path, model, edges: torch.Tensor, estimate, metrics: dict, eval_n: int, dtype: str
) -> dict:
    """The model card's facts of a finished run in `out`: config, training figures, data, params and metrics."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    card = {
        "config": dataclasses.asdict(cfg),
        "steps_done": log[-1]["step"],
        "train_seconds": round(log[-1]["seconds"], 1),
        "final_train_loss": {k: v for k, v in log[-1].items() if k not in ("step", "samples", "seconds")},
        "seed": cfg.seed,
        "data": f"world train split, single-object scenes 0..{cfg.samples - 1}; metrics on "
        f"test split scenes 0..{eval_n - 1}",
        "params": dataclasses.asdict(model.params),
        "position_edges_u": [round(e, 4) for e in edges.tolist()],
        "metrics": metrics,
        "weights_dtype": dtype,
    }
    if estimate is not None:
        card["dimension_estimate"] = estimate
    return card


def main(argv: list[str] | None = None) -> None:
    import shlex
    import sys

    from kinema.eval.iin import evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default=IINTrainConfig.kind, choices=KINDS)
    ap.add_argument(
        "--representation",
        default=IINTrainConfig.representation,
        choices=REPRESENTATIONS,
        help="the autoencoder code the IIN interprets: vae (4x16x16 latent) or vector_ae (a vector)",
    )
    ap.add_argument("--steps", type=int, default=IINTrainConfig.steps)
    ap.add_argument("--samples", type=int, default=IINTrainConfig.samples)
    ap.add_argument("--components", type=int, default=IINTrainConfig.components)
    ap.add_argument("--blocks", type=int, default=IINTrainConfig.blocks)
    ap.add_argument("--hidden", type=int, default=IINTrainConfig.hidden)
    ap.add_argument("--mixing", default=IINTrainConfig.mixing, choices=("lu", "permute"))
    ap.add_argument("--batch", type=int, default=IINTrainConfig.batch)
    ap.add_argument("--lr", type=float, default=IINTrainConfig.lr)
    ap.add_argument("--rho", type=float, default=IINTrainConfig.rho)
    ap.add_argument("--noise", type=float, default=IINTrainConfig.noise, help="training noise on x (whitened units)")
    ap.add_argument(
        "--factor-dims",
        type=int,
        nargs=len(FACTORS),
        default=None,
        metavar="N",
        help=f"dimensions of {', '.join(FACTORS)} (default: the paper's estimate)",
    )
    ap.add_argument("--seed", type=int, default=IINTrainConfig.seed)
    ap.add_argument("--eval-n", type=int, default=1000, help="test renders for the metrics")
    ap.add_argument("--edit-n", type=int, default=200, help="decoded edits / samples per metric")
    ap.add_argument("--models", type=Path, default=Path("models"), help="model repository with the autoencoder")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default runs/iin_<kind>)")
    ap.add_argument("--export", type=Path, default=None, help="models/ folder to write the model into")
    ap.add_argument(
        "--export-dtype",
        default="float16",
        choices=("float16", "float32"),
        help="weights as shipped: float16 halves the file; the flow still inverts exactly in fp32",
    )
    ap.add_argument("--name", default=None, help="model folder name under --export (default iin_<kind>)")
    ap.add_argument("--results", type=Path, default=None, help="JSON file to write the metrics into")
    add_runtime_args_iin(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = IINTrainConfig(
        kind=args.kind,
        representation=args.representation,
        steps=args.steps,
        samples=args.samples,
        components=args.components,
        blocks=args.blocks,
        hidden=args.hidden,
        mixing=args.mixing,
        batch=args.batch,
        lr=args.lr,
        rho=args.rho,
        noise=args.noise,
        factor_dims=tuple(args.factor_dims or ()),
        seed=args.seed,
        checkpoint_every=args.checkpoint_every or IINTrainConfig.checkpoint_every,
    )
    out = args.out or Path("runs") / f"iin_{cfg.kind}"
    model, edges, estimate, data = train(cfg, out, args.models, args.max_seconds)
    if args.export_dtype == "float16":
        round_to_half(model)  # the metrics below are those of the weights that ship
    set_prototypes(model, data, edges)
    test = factor_data("test", args.eval_n, args.models, representation=cfg.representation)
    metrics = evaluate(
        model, cfg.kind, data, test, edges, args.models, args.edit_n, seed=cfg.seed, representation=cfg.representation
    )
    card = run_card(cfg, out, model, edges, estimate, metrics, args.eval_n, args.export_dtype)
    print(json.dumps(metrics, indent=2), flush=True)
    command = "python -m kinema.train.iin " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"command": command, **card}, indent=2))
    if args.export:
        path = export(model, cfg, args.export / (args.name or f"iin_{cfg.kind}"), card, command, args.export_dtype)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)


def add_runtime_args_iin(ap: argparse.ArgumentParser) -> None:
    """The shared runtime options that apply here (CPU only: these flows train in minutes on two cores)."""
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default; 1 when cores are shared)")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="end the run after this much training time, whatever --steps says",
    )
    ap.add_argument("--checkpoint-every", type=int, default=None, help="steps between resumable checkpoints")


if __name__ == "__main__":
    main()
