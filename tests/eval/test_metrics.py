"""PSNR, SSIM and the fixed-grid flow-matching validation loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from kinema.eval.metrics import DEFAULT_T_GRID, flow_matching_val_loss, psnr, ssim


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.2, 0.8, size=(3, 32, 32, 3))


def test_psnr_of_identical_images_is_infinite(images: np.ndarray) -> None:
    assert np.isinf(psnr(images, images)).all()


def test_psnr_matches_the_formula(images: np.ndarray) -> None:
    delta = 0.05
    np.testing.assert_allclose(psnr(images, images + delta), 10 * np.log10(1 / delta**2))
    sigma = 0.1
    noisy = images + np.random.default_rng(1).normal(0, sigma, images.shape)
    np.testing.assert_allclose(psnr(images, noisy), -20 * np.log10(sigma), atol=0.15)
    np.testing.assert_allclose(psnr(images * 255, noisy * 255, data_range=255), psnr(images, noisy))


def test_psnr_rejects_mismatched_or_unbatched_inputs(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="differ"):
        psnr(images, images[:2])
    with pytest.raises(ValueError, match="batch"):
        psnr(images[0], images[0])


def test_ssim_of_identical_images_is_one(images: np.ndarray) -> None:
    np.testing.assert_allclose(ssim(images, images), 1.0)


def test_ssim_falls_with_noise_and_is_symmetric(images: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    light = images + rng.normal(0, 0.02, images.shape)
    heavy = images + rng.normal(0, 0.2, images.shape)
    s_light, s_heavy = ssim(images, light), ssim(images, heavy)
    assert (s_heavy < s_light).all() and (s_light < 1).all()
    np.testing.assert_allclose(ssim(light, images), s_light)
    ref = structural_similarity(
        images[0],
        heavy[0],
        data_range=1.0,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert s_heavy[0] == pytest.approx(ref)


def test_flow_matching_val_loss_oracle_is_zero_and_zero_velocity_is_one() -> None:
    x0 = torch.zeros(16, 3, 8, 8)
    # With x0 known (passed as cond) the true velocity is (x_t - x0) / t - x0 = eps - x0.
    oracle = lambda x_t, t, c: (x_t - c) / t.view(-1, 1, 1, 1) - c
    out = flow_matching_val_loss(oracle, x0, cond=x0)
    assert out["loss"] == pytest.approx(0.0, abs=1e-10)
    assert len(out) == len(DEFAULT_T_GRID) + 1 and "loss@0.100" in out and "loss@0.900" in out
    zero = flow_matching_val_loss(lambda x_t, t, c: torch.zeros_like(x_t), x0)  # E[eps^2] = 1
    assert zero["loss"] == pytest.approx(1.0, abs=0.05)


def test_flow_matching_val_loss_is_deterministic_per_seed() -> None:
    x0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    fn = lambda x_t, t, c: 0.5 * x_t
    a, b = flow_matching_val_loss(fn, x0, seed=3), flow_matching_val_loss(fn, x0, seed=3)
    assert a == b
    assert flow_matching_val_loss(fn, x0, seed=4) != a
    assert list(flow_matching_val_loss(fn, x0, t_grid=(0.25, 0.75))) == ["loss@0.250", "loss@0.750", "loss"]


def test_flow_matching_val_loss_checks_its_inputs() -> None:
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t_grid"):
        flow_matching_val_loss(lambda x, t, c: x, x0, t_grid=(1.5,))
    with pytest.raises(ValueError, match="shape"):
        flow_matching_val_loss(lambda x, t, c: x[:, :1], x0)


def test_validation_flow_loss_on_a_set_made_once_is_the_loss_made_in_place() -> None:
    """bench/self_flow.py scores many snapshots on one `validation_set`: the same numbers as encoding each time."""
    from kinema.eval.generation import validation_flow_loss, validation_set
    from kinema.repository import default_models_dir, load_autoencoder, load_denoiser, load_text_encoder_default

    models = default_models_dir()
    autoencoder, _ = load_autoencoder(models)
    denoiser, _ = load_denoiser(models)
    text_encoder = load_text_encoder_default()
    data = validation_set(autoencoder, text_encoder, n=4)
    assert data[0].shape[0] == 4 and data[1].tokens.shape[0] == 4
    once = validation_flow_loss(denoiser, autoencoder, text_encoder, data=data)
    assert once == validation_flow_loss(denoiser, autoencoder, text_encoder, n=4)
    assert 0 < once["loss"] < 2 and set(once) == {"loss"} | {f"loss@{t:.3f}" for t in DEFAULT_T_GRID}
