"""The shipped Triton model repository: configs parse, name real networks, and pin the weights beside them."""

import json
import shutil
from pathlib import Path

import pytest

from kinema.inference import triton_python
from kinema.inference.model_card import CARD, stated_sha256
from kinema.inference.model_config import latest_version, model_dirs, parameters, read_config, sync_hashes
from kinema.inference.networks import NETWORKS, load_network
from kinema.inference.runner import LocalRunner

MODELS = Path(__file__).resolve().parents[2] / "models"
SERVED = model_dirs(MODELS)
SHA_PREFIX = stated_sha256(MODELS / "iin_factor")[:12]


def test_the_repository_serves_the_shipped_networks():
    names = ["denoiser", "denoiser_2step", "denoiser_4step", "depth", "iin_factor", "iin_invariance", "iin_net2net",
             "text_encoder", "vae_decoder", "vae_encoder", "vector_ae_decoder", "vector_ae_encoder",
             "video_denoiser"]  # fmt: skip
    assert [d.name for d in SERVED] == names


@pytest.mark.parametrize("model_dir", SERVED, ids=lambda d: d.name)
def test_config_matches_its_network_and_pins_its_weights(model_dir: Path):
    config = read_config(model_dir)
    params = parameters(config)
    kind = params.get("network", model_dir.name)  # a variant (denoiser_4step) names the network it runs
    network = load_network(kind, model_dir / latest_version(model_dir), params)
    assert config.backend == "python" and config.max_batch_size > 0 and config.HasField("dynamic_batching")
    assert kind in NETWORKS
    assert [(i.name, i.optional) for i in config.input] == [(s.name, s.optional) for s in network.inputs]
    assert sorted(o.name for o in config.output) == sorted(s.name for s in network.outputs)
    # A stale hash would make Triton refuse the model: run `python -m kinema.inference.model_config --sync models`.
    assert params["weights_sha256"] == network.sha256, "config.pbtxt weights_sha256 is stale"
    assert stated_sha256(model_dir) == network.sha256, "the model card's weights_sha256 is stale"
    assert (model_dir / latest_version(model_dir) / "model.py").is_file()
    if "params_json" in params:  # published for services (Triton has no other room for them): current
        assert json.loads(params["params_json"]) == json.loads(network.params_json), "config.pbtxt params_json is stale"


def test_sync_rewrites_published_params_and_a_stale_copy_refuses_to_load(tmp_path: Path):
    model = tmp_path / "iin_factor"
    shutil.copytree(MODELS / "iin_factor", model)
    config = model / "config.pbtxt"
    config.write_text(config.read_text().replace('"factor_names', '"stale_names'))
    params = parameters(read_config(model))
    with pytest.raises(ValueError, match="params_json differs"):
        load_network("iin", model / "1", params)
    assert sync_hashes(tmp_path) == {"iin_factor": params["weights_sha256"]}
    assert config.read_text() == (MODELS / "iin_factor" / "config.pbtxt").read_text()


def _triton_args(model_dir: Path) -> dict:
    """What Triton's python backend hands a model's `initialize` (tests/inference/test_triton_python.py)."""
    from google.protobuf import json_format

    config = json_format.MessageToDict(read_config(model_dir), preserving_proto_field_name=True)
    return {"model_config": json.dumps(config), "model_name": model_dir.name, "model_instance_kind": "CPU",
            "model_instance_device_id": "0", "model_repository": str(model_dir), "model_version": "1"}  # fmt: skip


def _loads(model_dir: Path) -> list[str]:
    """The load errors of the Triton path (`initialize`) and the local backend, in that order; [] when both load."""
    errors = []
    for load in (lambda: triton_python.build("iin", _triton_args(model_dir)),
                 lambda: LocalRunner(model_dir.parent).describe(model_dir.name)):  # fmt: skip
        try:
            load()
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_weights_other_than_the_model_cards_are_refused_with_what_to_do(tmp_path: Path):
    """A copy of a shipped model whose card names other weights than the file's (config still right) is refused by
    Triton's load and the local backend alike, saying which hash is which and how to settle it; --sync settles it."""
    model = tmp_path / "iin_factor"
    shutil.copytree(MODELS / "iin_factor", model)
    card = model / CARD
    shipped = card.read_text()
    sha = stated_sha256(model)
    other = "f" * 64
    card.write_text(shipped.replace(f"| weights_sha256 | {sha} |", f"| weights_sha256 | {other} |"))
    errors = _loads(model)
    assert len(errors) == 2
    for message in errors:
        assert message.startswith(f"iin_factor: the weights hash to {sha}, but the model card {card} states "
                                  f"weights_sha256 {other}: they are not the weights the card describes")  # fmt: skip
        assert "python -m kinema.inference.model_config --sync MODELS" in message
    assert sync_hashes(tmp_path) == {"iin_factor": sha}
    assert card.read_text() == shipped and _loads(model) == []


ROW = "| weights_sha256 | {} |\n"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda card, sha: card.write_text(card.read_text().replace(ROW.format(sha), "")), "found 0 rows"),
        (lambda card, sha: card.write_text(card.read_text().replace(sha, sha[:12])), f"found '{SHA_PREFIX}'"),
        (lambda card, sha: card.unlink(), "no model card"),
    ],
    ids=["no row", "not a hash", "no card"],
)
def test_a_card_that_states_no_weights_hash_is_refused_and_sync_writes_it(tmp_path: Path, change, words):
    model = tmp_path / "iin_factor"
    shutil.copytree(MODELS / "iin_factor", model)
    card, sha = model / CARD, stated_sha256(model)
    params = parameters(read_config(model))
    change(card, sha)
    with pytest.raises(ValueError) as e:
        load_network("iin", model / "1", params)
    assert words in str(e.value) and "--sync MODELS" in str(e.value), e.value
    load_network("iin", model / "1", {k: v for k, v in params.items() if k != "weights_sha256"})  # no pin: no check
    assert sync_hashes(tmp_path) == {"iin_factor": sha}
    assert stated_sha256(model) == sha and card.read_text().count("| weights_sha256 |") == 1
    if words != "no model card":  # the row goes back where sync puts it: the card is as shipped
        assert card.read_text() == (MODELS / "iin_factor" / CARD).read_text()
    load_network("iin", model / "1", params)


def test_sync_refuses_a_card_with_two_hash_rows(tmp_path: Path):
    model = tmp_path / "iin_factor"
    shutil.copytree(MODELS / "iin_factor", model)
    card = model / CARD
    card.write_text(card.read_text() + ROW.format("0" * 64))
    with pytest.raises(ValueError, match="found 2 rows"):
        stated_sha256(model)
    with pytest.raises(ValueError, match="2 weights_sha256 rows; keep one"):
        sync_hashes(tmp_path)


@pytest.mark.parametrize("name", ["depth", "video_denoiser", "denoiser_4step", "vae_decoder"])
def test_embedded_loaders_refuse_weights_their_card_does_not_state(tmp_path: Path, name: str):
    """Embedded mode (`kinema.repository`) checks the same config and card hashes as Triton's load."""
    from kinema.repository import load_autoencoder, load_denoiser, load_depth, load_video_denoiser

    load = {"depth": load_depth, "video_denoiser": load_video_denoiser, "vae_decoder": load_autoencoder,
            "denoiser_4step": lambda m: load_denoiser(m, name="denoiser_4step")}[name]  # fmt: skip
    for model in {name, "vae_encoder"} if name == "vae_decoder" else {name}:
        shutil.copytree(MODELS / model, tmp_path / model)
    assert load(tmp_path)[1]  # the shipped copy loads
    card = tmp_path / name / CARD
    sha = stated_sha256(tmp_path / name)
    card.write_text(card.read_text().replace(f"| weights_sha256 | {sha} |", f"| weights_sha256 | {'f' * 64} |"))
    with pytest.raises(ValueError, match=f"{name}: the weights hash to {sha}, but the model card"):
        load(tmp_path)
