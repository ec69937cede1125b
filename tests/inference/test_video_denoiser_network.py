"""The served video denoiser network (`VideoDenoiserNetwork`): VideoMMDiT's forward per request, a row per clip, rows of
either temporal flag in one dynamic batch, and the reference content as a request kind of its own."""

from pathlib import Path

import numpy as np
import pytest
import torch

from kinema.errors import InvalidInput
from kinema.inference.networks import load_network, run_batch
from kinema.nn.checkpoint import save_checkpoint
from kinema.nn.video import VideoMMDiT, VideoMMDiTParams

PARAMS = VideoMMDiTParams(depth=2, hidden_size=32, num_heads=2, context_dim=16, pooled_dim=8, max_frames=6,
                          reference_hidden=16)  # fmt: skip


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """A tiny random network in the shipped layout; every weight drawn, so the temporal layers and structure act."""
    torch.manual_seed(0)
    model = VideoMMDiT(PARAMS)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    version = tmp_path_factory.mktemp("video_denoiser") / "1"
    save_checkpoint(version / "video_mmdit.safetensors", model.state_dict(), PARAMS)
    return load_network("video_denoiser", version, {})


def _velocity_inputs(rows: int, frames: int = 3, temporal: bool | list[bool] = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    flags = temporal if isinstance(temporal, list) else [temporal] * rows
    return {
        "X": f32(rows, frames, 4, 4, 6),
        "T": rng.uniform(0, 1, (rows, 1)).astype(np.float32),
        "CONTEXT": f32(rows, 5, 16),
        "CONTEXT_MASK": np.array([[True, True, True, False, False]] * rows),
        "POOLED": f32(rows, 8),
        "STRUCTURE": f32(rows, frames, 1, 4, 6),
        "STRUCTURE_LEVEL": rng.uniform(0, 1, (rows, 1)).astype(np.float32),
        "TEMPORAL": np.array(flags)[:, None],
    }


def test_velocity_is_the_models_forward_pass(network):
    inputs = _velocity_inputs(2)
    got = network(inputs)["VELOCITY"]
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.inference_mode():
        want = network.model(t["X"], t["T"][:, 0], t["CONTEXT"], t["POOLED"], t["CONTEXT_MASK"],
                             structure=t["STRUCTURE"], structure_level=t["STRUCTURE_LEVEL"][:, 0])  # fmt: skip
        frame_wise = network.model(t["X"], t["T"][:, 0], t["CONTEXT"], t["POOLED"], t["CONTEXT_MASK"],
                                   structure=t["STRUCTURE"], structure_level=t["STRUCTURE_LEVEL"][:, 0],
                                   temporal=False)  # fmt: skip
    assert got.shape == (2, 3, 4, 4, 6) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want.numpy())
    assert not np.allclose(got, frame_wise.numpy(), atol=1e-3)  # the flag reaches the temporal layers


def test_a_batch_mixing_temporal_flags_runs_each_row_as_its_own_request_would(network):
    mixed = _velocity_inputs(3, temporal=[True, False, True], seed=1)
    together = network(mixed)["VELOCITY"]
    for i in range(3):
        alone = network({k: v[i : i + 1] for k, v in mixed.items()})["VELOCITY"]
        np.testing.assert_allclose(together[i : i + 1], alone, atol=1e-5)


def test_reference_content_is_a_request_kind_of_its_own(network):
    latent = np.random.default_rng(2).standard_normal((2, 4, 4, 6)).astype(np.float32)
    velocity, content = run_batch(network, [_velocity_inputs(1), {"REFERENCE_LATENT": latent}])
    assert sorted(velocity) == ["VELOCITY"]
    assert sorted(content) == ["CONTENT_MASK", "CONTENT_POOLED", "CONTENT_TOKENS"]
    with torch.inference_mode():
        tokens, _, pooled = network.model.reference(torch.from_numpy(latent))
    np.testing.assert_array_equal(content["CONTENT_TOKENS"], tokens.numpy())  # (2, 4, 16): a 2 x 2 grid of tokens
    assert content["CONTENT_MASK"].dtype == bool and content["CONTENT_MASK"].all()
    np.testing.assert_array_equal(content["CONTENT_POOLED"], pooled.numpy())


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda i: i | {"REFERENCE_LATENT": np.zeros((1, 4, 4, 6), np.float32)}, "exactly one"),
        (lambda i: {"REFERENCE_LATENT": np.zeros((1, 3, 4, 6), np.float32)}, "4 channels"),
        (lambda i: {k: v for k, v in i.items() if k != "TEMPORAL"}, "TEMPORAL"),
        (lambda i: i | {"X": np.zeros((1, 7, 4, 4, 6), np.float32)}, "1..6"),
        (lambda i: i | {"X": np.zeros((1, 3, 4, 5, 6), np.float32)}, "multiple of 2"),
        (lambda i: i | {"STRUCTURE": np.zeros((1, 2, 1, 4, 6), np.float32)}, "STRUCTURE"),
        (lambda i: i | {"STRUCTURE_LEVEL": np.full((1, 1), 1.5, np.float32)}, "STRUCTURE_LEVEL"),
        (lambda i: i | {"CONTEXT": np.zeros((1, 5, 15), np.float32)}, "width 16"),
    ],
)
def test_bad_requests_get_their_own_error(network, change, words):
    (result,) = run_batch(network, [change(_velocity_inputs(1))])
    assert isinstance(result, InvalidInput) and words in str(result), result


def test_structure_and_its_level_are_optional(network):
    inputs = {k: v for k, v in _velocity_inputs(1).items() if k not in ("STRUCTURE", "STRUCTURE_LEVEL")}
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.inference_mode():
        want = network.model(t["X"], t["T"][:, 0], t["CONTEXT"], t["POOLED"], t["CONTEXT_MASK"])
    np.testing.assert_array_equal(network(inputs)["VELOCITY"], want.numpy())


def test_the_shipped_model_publishes_the_params_of_its_weights():
    from kinema.inference.model_config import parameters, read_config

    models = Path(__file__).resolve().parents[2] / "models"
    params = parameters(read_config(models / "video_denoiser"))
    network = load_network("video_denoiser", models / "video_denoiser" / "1", params)  # refuses stale params_json
    assert (network.model.params.in_channels, network.model.params.max_frames) == (4, 64)
