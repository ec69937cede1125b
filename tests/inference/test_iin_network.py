"""The served IIN network (`IinNetwork`): one direction per request, exact round trips, prototypes by index."""

from pathlib import Path

import numpy as np
import pytest

from kinema.errors import InvalidInput
from kinema.inference.model_config import parameters, read_config
from kinema.inference.networks import load_network, run_batch

MODELS = Path(__file__).resolve().parents[2] / "models"


def _network(name: str):
    return load_network("iin", MODELS / name / "1", parameters(read_config(MODELS / name)))


def _codes(n: int) -> np.ndarray:
    """The vector autoencoder's codes of n test renders: what iin_factor interprets (far off them, e.g. N(0, I)
    codes, its flow saturates and does not invert)."""
    from kinema.train.autoencoder import to_tensor
    from kinema.train.iin import render_single_objects
    from kinema.train.vector_ae import load_vector_autoencoder

    images = to_tensor(render_single_objects("test", 0, n)["images"])
    return load_vector_autoencoder(MODELS).encode(images).numpy()


@pytest.fixture(scope="module")
def factor():
    return _network("iin_factor")


def test_factorize_then_compose_is_exact_and_values_set_prototypes(factor):
    latents = _codes(3)
    f = factor({"LATENT": latents})
    assert f["Z"].shape == (3, 64) and f["OUTSIDE"].shape == (3, 64) and f["SCORES"].shape == (3, 14)
    np.testing.assert_allclose(f["SCORES"][:, :6].sum(1), 1.0, atol=1e-5)  # colour: 6 values
    back = factor({"Z": f["Z"], "OUTSIDE": f["OUTSIDE"]})["LATENT"]
    np.testing.assert_allclose(back, latents, atol=1e-4)
    values = np.array([[4, -1, -1, -1]] * 3, np.int32)  # colour := blue, the rest kept
    edited = factor({"Z": f["Z"], "OUTSIDE": f["OUTSIDE"], "VALUES": values})["LATENT"]
    z = factor({"LATENT": edited})["Z"]
    _, blue = factor.model.prototypes("colour")
    colour, shape = factor.model.layout.slice("colour"), factor.model.layout.slice("shape")
    # The edited z lies between the data's colours: the round trip T(T^-1(z)) holds to ~1e-2 there (8e-3 seen).
    np.testing.assert_allclose(z[:, colour], np.broadcast_to(blue[4].numpy(), (3, 8)), atol=2e-2)
    np.testing.assert_allclose(z[:, shape], f["Z"][:, shape], atol=2e-2)


def test_a_dynamic_batch_mixes_directions_and_keeps_bad_requests_apart(factor):
    latents = np.zeros((1, 64), np.float32)
    z = np.zeros((2, 64), np.float32)
    requests = [
        {"LATENT": latents},
        {"Z": z},
        {"LATENT": latents, "Z": z[:1]},
        {"Z": z, "VALUES": np.array([[6, -1, -1, -1]] * 2, np.int32)},  # colour has 6 values: 0..5
    ]
    forward, inverse, both, out_of_range = run_batch(factor, requests)
    assert sorted(forward) == ["OUTSIDE", "SCORES", "Z"] and forward["Z"].shape == (1, 64)
    assert sorted(inverse) == ["LATENT"] and inverse["LATENT"].shape == (2, 64)
    assert isinstance(both, InvalidInput) and "exactly one" in str(both)
    assert isinstance(out_of_range, InvalidInput) and "VALUES" in str(out_of_range)


def test_a_conditional_model_needs_its_condition():
    net2net = _network("iin_net2net")
    assert [s.name for s in net2net.inputs] == ["LATENT", "Z", "OUTSIDE", "COND"]
    out = net2net({"Z": np.zeros((2, 64), np.float32), "COND": np.zeros((2, 384), np.float32)})
    assert out["LATENT"].shape == (2, 64)  # the vector autoencoder's code
    (missing,) = run_batch(net2net, [{"Z": np.zeros((1, 64), np.float32)}])
    assert isinstance(missing, InvalidInput) and "COND" in str(missing)
