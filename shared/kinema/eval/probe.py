"""Attribute probe: which coloured primitives an RGB image shows, and where.

Colour comes from segmenting saturated pixels by hue against the world's palette (floors and walls
are low-saturation greys, object colours are 47+ degrees of hue apart and shading only scales them
or adds white, which keeps hue). Shape comes from a tiny CNN (`ShapeNet`) on a normalised crop of
each segment, trained on train-split renders with blur, noise and colour jitter so that it can
judge generated images (`kinema.eval.probe_train`). Scoring against captions is in `scoring.py`.

    python -m kinema.eval.probe --train          # retrain, writes models/probe/probe.safetensors
    python -m kinema.eval.probe --eval --n 1000  # accuracy on clean test renders
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from scipy import ndimage
from torch import nn

from kinema.data.scene import COLOURS, SHAPES

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[3] / "models" / "probe" / "probe.safetensors"  # the checkout's


def default_weights() -> Path:
    """The probe in `KINEMA_MODELS` when it is set (an image, a worker with a mounted repository), else the
    checkout's `models/probe/probe.safetensors`."""
    models = os.environ.get("KINEMA_MODELS")
    return Path(models) / "probe" / "probe.safetensors" if models else DEFAULT_WEIGHTS


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in [0, 360) of (..., 3) RGB, the circular form atan2(sqrt(3) (G - B), 2R - G - B)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360.0


PALETTE: tuple[str, ...] = tuple(COLOURS)
PALETTE_HUES = hue_degrees(np.array(list(COLOURS.values())))  # (6,)


@dataclass(frozen=True)
class SegmentParams:
    # Render statistics (train split): background saturation <= 0.42, object pixels >= 0.59.
    min_saturation: float = 0.5
    min_chroma: float = 0.12
    # Rendered objects stay within 6 degrees of their palette hue; a blend of two neighbouring
    # palette colours at a blurry edge falls in the gap between them and is dropped.
    max_hue_distance: float = 22.0
    min_area: float = 0.002  # fraction of the image
    # Opening width as a fraction of the image width: a segment must hold a 3x3 block at 64 px,
    # which removes the thin fringes that blur leaves between two objects.
    opening: float = 3 / 64


@dataclass(frozen=True)
class ShapeNetParams:
    crop: int = 20  # side of the normalised crop; divisible by 4 (two 2x poolings)
    width: int = 16
    hidden: int = 64

    def __post_init__(self) -> None:
        if self.crop % 4:
            raise ValueError(f"crop must be divisible by 4, got {self.crop}")


class ShapeNet(nn.Module):
    """Crop (N, 3, S, S) -> logits over SHAPES; channels: segment mask, other objects, brightness."""

    def __init__(self, params: ShapeNetParams) -> None:
        super().__init__()
        self.params = params
        w = params.width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * (params.crop // 4) ** 2, params.hidden),
            nn.ReLU(),
            nn.Linear(params.hidden, len(SHAPES)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, len(SHAPES))


@dataclass(frozen=True)
class Segment:
    colour: str
    mask: np.ndarray  # (H, W) bool
    u: float  # centroid, normalised: 0 = left edge, 1 = right edge
    v: float  # 0 = top, 1 = bottom
    area: float  # fraction of the image


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    u: float
    v: float
    area: float


@dataclass(frozen=True)
class ProbeResult:
    objects: tuple[DetectedObject, ...]  # ordered left to right

    def __iter__(self) -> Iterator[DetectedObject]:
        return iter(self.objects)

    def __len__(self) -> int:
        return len(self.objects)


def as_float_image(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 or float in [0, 1] -> float32 in [0, 1]."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.max(initial=0.0) > 1.5:  # clipping a 0..255 float image would whiten it silently
        raise ValueError(f"float images must lie in [0, 1], got a maximum of {image.max():.3g}")
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def segment(image: np.ndarray, params: SegmentParams = SegmentParams()) -> list[Segment]:
    """Connected components of saturated pixels, one palette colour each (8-connectivity)."""
    rgb = as_float_image(image)
    h, w = rgb.shape[:2]
    vmax, vmin = rgb.max(-1), rgb.min(-1)
    chroma = vmax - vmin
    saturated = (chroma > params.min_chroma) & (chroma > params.min_saturation * vmax)
    dist = np.abs((hue_degrees(rgb)[..., None] - PALETTE_HUES + 180.0) % 360.0 - 180.0)  # (H, W, 6)
    nearest = dist.argmin(-1)
    ok = saturated & (dist.min(-1) < params.max_hue_distance)
    k = max(1, round(params.opening * w))
    block = np.ones((k, k), bool)
    rows, cols = np.mgrid[0:h, 0:w]
    out = []
    for c, name in enumerate(PALETTE):
        mask = ok & (nearest == c)
        if not mask.any():
            continue
        core = ndimage.binary_opening(mask, structure=block)
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        for lab in range(1, n + 1):
            comp = labels == lab
            area = comp.sum()
            if area < params.min_area * h * w or not core[comp].any():
                continue
            u = (cols[comp].mean() + 0.5) / w
            v = (rows[comp].mean() + 0.5) / h
            out.append(Segment(name, comp, float(u), float(v), float(area / (h * w))))
    return out


def crops(image: np.ndarray, segments: list[Segment], size: int) -> torch.Tensor:
    """(K, 3, size, size) square crops around each segment, resolution-independent.

    Channels: the segment's mask, every other saturated segment (occluders), and brightness
    (max RGB) divided by the segment's brightest pixel, so that shading is colour-free.
    """
    if not segments:
        return torch.zeros(0, 3, size, size)
    rgb = as_float_image(image)
    h, w = rgb.shape[:2]
    value = rgb.max(-1)
    everything = np.any([s.mask for s in segments], axis=0)
    chans, centres, sides = [], [], []
    for s in segments:
        ys, xs = np.nonzero(s.mask)
        others = everything & ~s.mask
        chans.append(np.stack([s.mask, others, value / max(float(value[s.mask].max()), 1e-3)]))
        centres.append(((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2))
        sides.append(1.3 * max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()))
    x = torch.from_numpy(np.stack(chans).astype(np.float32))  # (K, 3, H, W)
    c = torch.tensor(centres, dtype=torch.float32)  # (K, 2) pixel coords (x, y)
    side = torch.tensor(sides, dtype=torch.float32)  # (K,)
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5  # (S,)
    gx = (c[:, 0:1] + t * side[:, None]) / w * 2 - 1  # (K, S) in grid_sample's [-1, 1]
    gy = (c[:, 1:2] + t * side[:, None]) / h * 2 - 1  # (K, S)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # (K, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Probe:
    """Segmentation plus the shape classifier; call it on one image or use `detect` on a batch."""

    def __init__(self, net: ShapeNet, params: SegmentParams = SegmentParams()) -> None:
        self.net = net.eval()
        self.params = params

    @classmethod
    def from_file(cls, path: Path | None = None) -> Probe:
        """Load weights and parameters from safetensors (never pickle); `path` None: `default_weights()`."""
        path = default_weights() if path is None else path
        if not Path(path).exists():
            raise FileNotFoundError(f"no probe weights at {path}; run `python -m kinema.eval.probe --train`")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        net = ShapeNet(ShapeNetParams(**json.loads(meta["net_params"])))
        net.load_state_dict(load_file(str(path)))
        return cls(net, SegmentParams(**json.loads(meta["segment_params"])))

    def metadata(self) -> dict[str, str]:
        return {"net_params": json.dumps(asdict(self.net.params)), "segment_params": json.dumps(asdict(self.params))}

    def __call__(self, image: np.ndarray) -> ProbeResult:
        return self.detect([image])[0]

    @torch.inference_mode()
    def detect(self, images: np.ndarray | list[np.ndarray]) -> list[ProbeResult]:
        """One `ProbeResult` per (H, W, 3) image."""
        segs = [segment(im, self.params) for im in images]
        x = torch.cat([crops(im, s, self.net.params.crop) for im, s in zip(images, segs, strict=True)])
        shapes = self.net(x).argmax(-1).tolist() if len(x) else []
        out, i = [], 0
        for s in segs:
            objs = [DetectedObject(g.colour, SHAPES[shapes[i + j]], g.u, g.v, g.area) for j, g in enumerate(s)]
            out.append(ProbeResult(tuple(sorted(objs, key=lambda o: o.u))))
            i += len(s)
        return out


def main(argv: list[str] | None = None) -> None:
    """CLI: retrain (`--train`) and/or measure accuracy on renders (`--eval`)."""
    import argparse
    import sys

    from kinema.eval import probe_train, scoring
    from kinema.eval.probe import Probe  # the importable module's class, not __main__'s copy

    ap = argparse.ArgumentParser(prog="python -m kinema.eval.probe", description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="retrain the shape classifier")
    ap.add_argument("--eval", action="store_true", help="score the probe on ground-truth renders")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--n-train", type=int, default=4000, help="train-split scenes")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=1000, help="scenes to evaluate")
    ap.add_argument("--blur", type=float, default=0.0, help="also evaluate with this Gaussian blur (px at 64 px)")
    ap.add_argument("--noise", type=float, default=0.0, help="also evaluate with this Gaussian noise sigma")
    args = ap.parse_args(argv)
    if not (args.train or args.eval):
        ap.error("nothing to do: pass --train and/or --eval")
    stats = probe_train.train(args.weights, args.n_train, args.epochs, args.seed) if args.train else None
    if args.eval:
        probe = Probe.from_file(args.weights)
        evals = {"clean": scoring.evaluate_world(probe, split=args.split, n=args.n)}
        if args.blur or args.noise:
            name = f"blur {args.blur}, noise {args.noise}"
            evals[name] = scoring.evaluate_world(probe, split=args.split, n=args.n, blur=args.blur, noise=args.noise)
        print(json.dumps(evals, indent=2))
        if stats is not None:  # a full run documents itself
            command = "python -m kinema.eval.probe " + " ".join(sys.argv[1:] if argv is None else argv)
            card = probe_train.model_card(stats, evals, command)
            args.weights.with_name("README.md").write_text(card)


if __name__ == "__main__":
    main()
