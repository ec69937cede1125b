"""FID: the Fréchet distance on known Gaussians, Inception features, and the cached reference statistics."""

from __future__ import annotations

import numpy as np
import pytest

from kinema.data import World
from kinema.eval import fid as fid_mod
from kinema.eval.fid import feature_stats, fid, fid_features, frechet_distance, reference_stats


def test_frechet_identity_covariances_shifted_mean_is_squared_distance() -> None:
    d = 16
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    assert frechet_distance(mu1, np.eye(d), mu2, np.eye(d)) == pytest.approx(d * 0.25)


def test_frechet_scaled_covariances() -> None:
    # N(0, a^2 I) vs N(0, b^2 I): Tr(a^2 I + b^2 I - 2 ab I) = d (a - b)^2
    d, a, b = 8, 2.0, 0.5
    assert frechet_distance(np.zeros(d), a**2 * np.eye(d), np.zeros(d), b**2 * np.eye(d)) == pytest.approx(
        d * (a - b) ** 2
    )


def test_frechet_handles_singular_covariances() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 32))  # fewer samples than dimensions: rank-deficient covariance
    mu, sigma = feature_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3
    y = rng.normal(size=(10, 32)) + 1.0
    assert frechet_distance(mu, sigma, *feature_stats(y)) > 20


def test_frechet_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.fixture(scope="module")
def renders() -> np.ndarray:
    images, _ = World().images("test", 0, 48)
    return images


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero_and_grows_for_a_different_set(renders: np.ndarray) -> None:
    feats = fid_features(renders)
    assert feats.shape == (48, 2048) and np.isfinite(feats).all()
    mu, sigma = feature_stats(feats)
    same = frechet_distance(mu, sigma, mu, sigma)
    assert abs(same) < 1.0
    other = 255 - renders  # colour-inverted renders: clearly another distribution
    mu2, sigma2 = feature_stats(fid_features(other))
    assert frechet_distance(mu, sigma, mu2, sigma2) > 100 + same


@pytest.mark.slow
def test_fid_between_two_halves_of_renders_is_below_renders_vs_noise(renders: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=renders[:16].shape, dtype=np.uint8)
    assert fid(renders[:16], renders[16:32]) < fid(renders[:16], noise)


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
