"""The shipped Triton model repository: configs parse, name real networks, and pin the weights beside them."""

import json
import shutil
from pathlib import Path

import pytest

from kinema.inference.model_config import latest_version, model_dirs, parameters, read_config, sync_hashes
from kinema.inference.networks import NETWORKS, load_network

MODELS = Path(__file__).resolve().parents[2] / "models"
SERVED = model_dirs(MODELS)


def test_the_repository_serves_the_shipped_networks():
    names = ["denoiser", "denoiser_4step", "depth", "iin_factor", "iin_invariance", "iin_net2net", "text_encoder",
             "vae_decoder", "vae_encoder", "video_denoiser"]  # fmt: skip
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
