import pytest
import torch

from kinema.nn.autoencoder import Autoencoder, AutoencoderParams, load_autoencoder_kl

TINY = AutoencoderParams(block_out_channels=(8, 16, 16), norm_num_groups=4, latent_channels=4)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_shapes_and_downscale() -> None:
    model = Autoencoder(TINY).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 4, 8, 8) and TINY.downscale == 4
    assert model.decode(z).shape == (2, 3, 32, 32)


def test_latent_normalisation_lives_in_params() -> None:
    torch.manual_seed(0)
    base = Autoencoder(TINY).eval()
    scaled = Autoencoder(AutoencoderParams(**{**TINY.__dict__, "scaling_factor": 2.0, "shift_factor": 0.5})).eval()
    scaled.load_state_dict(base.state_dict())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(scaled.encode(x), (base.encode(x) - 0.5) * 2.0)
    torch.testing.assert_close(scaled.decode(scaled.encode(x)), base.decode(base.encode(x)))


def test_kl_is_zero_for_the_prior_and_positive_otherwise() -> None:
    from kinema.nn.autoencoder import LatentDistribution

    zero = LatentDistribution(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2))
    assert torch.allclose(zero.kl(), torch.zeros(2))
    assert (LatentDistribution(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)).kl() > 0).all()


def test_tiny_autoencoder_learns_to_reconstruct() -> None:
    torch.manual_seed(0)
    model = Autoencoder(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    first = None
    for _ in range(60):
        loss = (model.decode_raw(model.posterior(x).mean) - x).abs().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("quant_conv", [True, False])
def test_diffusers_autoencoder_kl_loads_with_identical_outputs(tmp_path, quant_conv: bool) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ref = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
        scaling_factor=0.7,
        shift_factor=0.1,
    ).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_autoencoder_kl(tmp_path)
    assert ours.params.scaling_factor == 0.7 and ours.params.shift_factor == 0.1
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref_post = ref.encode(x).latent_dist
        post = ours.posterior(x)
        torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(post.logvar, ref_post.logvar, atol=1e-5, rtol=0)
        z = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(ours.decode_raw(z), ref.decode(z).sample, atol=1e-5, rtol=0)


def test_loader_rejects_a_folder_without_config(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_autoencoder_kl(tmp_path)
