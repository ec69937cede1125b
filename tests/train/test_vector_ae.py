"""The vector autoencoder (kinema.nn.vector_ae) and its trainer on a few real renders: shapes and errors, a short run
that learns, export and load (safetensors), and the IIN's use of it as its representation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kinema.errors import InvalidInput
from kinema.inference.model_config import parameters, read_config
from kinema.inference.runner import LocalRunner
from kinema.nn.vector_ae import VectorAutoencoder, VectorAutoencoderParams
from kinema.train import vector_ae
from kinema.train.iin import FactorData, IINTrainConfig, factor_data, load_representation, representation_fingerprint


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


SMALL = VectorAutoencoderParams(channels=(8, 16, 16, 16), dim=12)


def test_codes_and_images_have_the_stated_shapes_and_wrong_ones_are_refused() -> None:
    model = VectorAutoencoder(SMALL).eval()
    code = model.encode(torch.zeros(2, 3, 64, 64))
    assert code.shape == (2, 12)
    assert model.decode(code).shape == (2, 3, 64, 64) and model.decode_all(code).shape == (2, 4, 64, 64)
    assert torch.equal(model.decode(code), model.decode_all(code)[:, :3])  # the silhouette is dropped
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 64, 64\)"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"codes must be \(B, 12\)"):
        model.decode(torch.zeros(1, 13))
    with pytest.raises(ValueError, match="multiple of 16"):
        VectorAutoencoderParams(image_size=40)


def test_a_short_run_lowers_the_loss_resumes_exports_and_loads_back(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "run"
    cfg = vector_ae.VectorAETrainConfig(samples=64, dim=12, batch=16, steps=30, lr=3e-3, checkpoint_every=10)
    first = vector_ae.train(vector_ae.VectorAETrainConfig(**{**cfg.__dict__, "steps": 10}), out, cache=cache)
    assert (out / "state.safetensors").is_file()
    model = vector_ae.train(cfg, out, cache=cache)  # resumes at step 10
    rows = [line for line in (out / "log.jsonl").read_text().splitlines()]
    assert '"step": 1,' in rows[0] and '"step": 30,' in rows[-1]
    data = vector_ae.renders("train", 64, cache)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        before, _ = vector_ae.batch_loss(first, cfg, data["images"][:32], data["masks"][:32], gen)
        after, _ = vector_ae.batch_loss(model, cfg, data["images"][:32], data["masks"][:32], gen)
    assert after < before

    models = tmp_path / "models"
    paths = vector_ae.export(model, models, {"seed": 0}, "python -m kinema.train.vector_ae ...")
    assert [p.relative_to(models).as_posix() for p in paths] == ["vector_ae_encoder/1/encoder.safetensors",
                                                                 "vector_ae_decoder/1/decoder.safetensors"]  # fmt: skip
    loaded = vector_ae.load_vector_autoencoder(models)
    x = vector_ae.as_input(data["images"][:4])
    code = model.encode(x)
    assert torch.equal(loaded.encode(x), code) and torch.equal(loaded.decode(code), model.decode(code))
    with pytest.raises(FileNotFoundError, match=r"python -m kinema\.train\.vector_ae"):
        vector_ae.load_vector_autoencoder(tmp_path / "nowhere")

    # Served as two models (config, card with the weights' hash, model.py), in process as under Triton.
    runner = LocalRunner(models)
    assert runner.models() == ["vector_ae_decoder", "vector_ae_encoder"]
    served = runner.infer("vector_ae_encoder", {"IMAGE": x.numpy()})["LATENT"]
    np.testing.assert_allclose(served, code.numpy(), atol=1e-5)
    image = runner.infer("vector_ae_decoder", {"LATENT": served})["IMAGE"]
    np.testing.assert_allclose(image, model.decode(code).numpy(), atol=1e-4)
    with pytest.raises(InvalidInput, match="IMAGE must have shape"):
        runner.infer("vector_ae_encoder", {"IMAGE": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(InvalidInput, match="LATENT must have shape"):
        runner.infer("vector_ae_decoder", {"LATENT": np.zeros((1, 13), np.float32)})
    assert "vector_ae_encoder" in (models / "vector_ae_encoder" / "1" / "model.py").read_text()
    config = parameters(read_config(models / "vector_ae_encoder"))  # under Triton, the service reads these params
    assert json.loads(config["params_json"])["image_size"] == 64 and config["weights_sha256"] == runner.describe(
        "vector_ae_encoder").sha256  # fmt: skip

    # The IIN's data through this representation: (N, dim) codes, cached under the encoder's hash.
    assert load_representation("vector_ae", models).params.dim == 12
    fd = factor_data("test", 8, models, tmp_path / "iin-cache", representation="vector_ae")
    assert isinstance(fd, FactorData) and fd.latents.shape == (8, 12)
    assert torch.allclose(fd.latents, loaded.encode(vector_ae.as_input(fd.images)), atol=1e-5)
    assert len(representation_fingerprint("vector_ae", models)) == 12
    with pytest.raises(ValueError, match="unknown representation"):
        IINTrainConfig(representation="pixels")
    with pytest.raises(ValueError, match="unknown representation"):
        load_representation("pixels", models)


class _Grey(torch.nn.Module):
    """Decodes every code to mid-grey: on a black image, the same error (1.5) at every pixel and channel."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(len(x), 4)

    def decode_all(self, code: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full((len(code), 3, 64, 64), 0.5), torch.zeros(len(code), 1, 64, 64)], 1)


def _grey_loss(balance: float, images: torch.Tensor, masks: torch.Tensor) -> float:
    cfg = vector_ae.VectorAETrainConfig(size_balance=balance, code_noise=0.0, mask_weight=0.0, code_l2=0.0)
    return vector_ae.batch_loss(_Grey(), cfg, images, masks, None)[0].item()


def test_size_balance_weighs_a_small_objects_pixels_more_and_off_changes_nothing() -> None:
    """Off (0), every object pixel weighs 1 + object_weight; with size_balance 1 an image's object pixels weigh that
    times the batch's mean object area over its own (within 1/4..8), so a small object is not drowned by a large one."""
    images = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 30:34, 30:34] = 1  # a small object: 4x4, 6x6 = 36 pixels with the one around it
    masks[1, 16:48, 16:48] = 1  # a large one: 32x32, 34x34 = 1156 pixels
    areas, pixels = (36.0, 1156.0), 64 * 64
    for i, area in enumerate(areas):
        assert _grey_loss(0.0, images[i : i + 1], masks[i : i + 1]) == pytest.approx(1.5 * (pixels + 9 * area) / pixels)
    mean = sum(areas) / 2
    balance = [min(8.0, max(0.25, mean / a)) for a in areas]  # 8 (clamped from 16.6) and 0.52
    expected = 1.5 * sum(pixels + 9 * b * a for b, a in zip(balance, areas, strict=True)) / (2 * pixels)
    assert _grey_loss(1.0, images, masks) == pytest.approx(expected)
