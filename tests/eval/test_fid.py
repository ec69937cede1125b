"""FID: the Fréchet distance on known Gaussians, Inception features, and the cached reference statistics."""

from __future__ import annotations

import numpy as np
import pytest

from kinema.data import World
from kinema.eval import fid as fid_mod
from kinema.eval.fid import feature_stats, fid, fid_features, frechet_distance, reference_stats

METHODS = ("eigh", "sqrtm")


@pytest.mark.parametrize("method", METHODS)
def test_frechet_identity_covariances_shifted_mean_is_squared_distance(method: str) -> None:
    d = 16
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    assert frechet_distance(mu1, np.eye(d), mu2, np.eye(d), method=method) == pytest.approx(d * 0.25)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_scaled_covariances(method: str) -> None:
    # N(0, a^2 I) vs N(0, b^2 I): Tr(a^2 I + b^2 I - 2 ab I) = d (a - b)^2
    d, a, b = 8, 2.0, 0.5
    got = frechet_distance(np.zeros(d), a**2 * np.eye(d), np.zeros(d), b**2 * np.eye(d), method=method)
    assert got == pytest.approx(d * (a - b) ** 2)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_handles_singular_covariances(method: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 32))  # fewer samples than dimensions: rank-deficient covariance
    mu, sigma = feature_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-3
    y = rng.normal(size=(10, 32)) + 1.0
    assert frechet_distance(mu, sigma, *feature_stats(y), method=method) > 20


def test_frechet_methods_agree_on_general_covariances() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 48)), rng.normal(size=(200, 48)) @ rng.normal(size=(48, 48)) * 0.3 + 0.2
    sa, sb = feature_stats(a), feature_stats(b)
    assert frechet_distance(*sa, *sb, method="eigh") == pytest.approx(frechet_distance(*sa, *sb, method="sqrtm"))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(*sa, *sb, method="svd")


def test_frechet_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.fixture(scope="module")
def renders() -> np.ndarray:
    images, _ = World().images("test", 0, 32)
    return images


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero_and_grows_for_a_different_set(renders: np.ndarray) -> None:
    feats = fid_features(renders, batch=16)
    assert feats.shape == (32, 2048) and np.isfinite(feats).all()
    mu, sigma = feature_stats(feats)
    same = frechet_distance(mu, sigma, mu, sigma)
    assert abs(same) < 1.0
    other = 255 - renders  # colour-inverted renders: clearly another distribution
    mu2, sigma2 = feature_stats(fid_features(other))
    assert frechet_distance(mu, sigma, mu2, sigma2) > 100 + same


@pytest.mark.slow
def test_fid_between_renders_is_below_renders_vs_noise(renders: np.ndarray) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=renders[:8].shape, dtype=np.uint8)
    assert fid(renders[:8], renders[8:16]) < fid(renders[:8], noise)


def test_fid_features_reject_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        fid_features(np.zeros((2, 64, 64, 3), np.float32))


def test_reference_stats_are_cached_by_params(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_features(images: np.ndarray, batch: int = 32) -> np.ndarray:
        calls.append(len(images))
        return images.reshape(len(images), -1)[:, :8].astype(np.float64)

    monkeypatch.setattr(fid_mod, "fid_features", fake_features)
    world = World()
    mu, sigma = reference_stats(world, split="val", n=6, cache_dir=tmp_path)
    again = reference_stats(world, split="val", n=6, cache_dir=tmp_path)
    assert calls == [6]
    np.testing.assert_array_equal(mu, again[0])
    np.testing.assert_array_equal(sigma, again[1])
    assert len(list(tmp_path.glob("fid-ref-val-6-*.npz"))) == 1
    reference_stats(world, split="val", n=5, cache_dir=tmp_path)
    assert calls == [6, 5]


def test_real_floor_scores_validation_renders_against_the_reference_once(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_features(images: np.ndarray, batch: int = 32) -> np.ndarray:
        calls.append(len(images))
        return images.reshape(len(images), -1)[:, :8].astype(np.float64)

    monkeypatch.setattr(fid_mod, "fid_features", fake_features)
    floor = fid_mod.real_floor(6, split="test", reference_n=10, cache_dir=tmp_path)
    assert sorted(calls) == [6, 10] and floor > 0  # 6 validation renders and the 10-render test reference
    assert fid_mod.real_floor(6, split="test", reference_n=10, cache_dir=tmp_path) == floor
    assert sorted(calls) == [6, 10]  # cached


def test_reconstruction_fid_of_a_lossless_autoencoder_is_the_real_floor(tmp_path, monkeypatch) -> None:
    """rFID runs validation renders through the autoencoder: an identity one scores what the renders score."""
    import torch

    def fake_features(images: np.ndarray, batch: int = 32) -> np.ndarray:
        return images.reshape(len(images), -1)[:, :8].astype(np.float64)

    class Identity:
        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return z

    class Dark(Identity):
        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return z * 0.5 - 0.5

    monkeypatch.setattr(fid_mod, "fid_features", fake_features)
    floor = fid_mod.real_floor(6, split="test", reference_n=10, cache_dir=tmp_path)
    rfid = fid_mod.reconstruction_fid(Identity(), 6, split="test", reference_n=10, cache_dir=tmp_path)
    assert rfid == pytest.approx(floor)
    assert fid_mod.reconstruction_fid(Dark(), 6, split="test", reference_n=10, cache_dir=tmp_path) > floor + 1
