"""The GPU profile with the real tritonserver: `--model-config-name=gpu` loads each model's configs/gpu.pbtxt, and a
model without one keeps its config.pbtxt. On a machine without a GPU (this one) Triton itself refuses the KIND_GPU
instance, which shows it read the GPU config; with a GPU the shipped depth model serves what the CPU network gives."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kinema.errors import InvalidInput, Unavailable
from kinema.inference.model_config import GPU_CONFIG, config_path, parameters, read_config
from kinema.inference.networks import load_network
from kinema.repository import default_models_dir
from kinema.tritonserver import TritonServer, TritonSettings, _Install, add_arguments, settings_from_args

MODELS = default_models_dir()


def _settings(models: Path, **kw) -> TritonSettings:
    return TritonSettings(models=models, http_port=0, grpc_port=0, metrics_port=0, models_to_load=("depth",),
                          startup_timeout=120.0, **kw)  # fmt: skip


def _depth(url: str, images: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput("IMAGE", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        return client.infer("depth", [inp]).as_numpy("DEPTH")
    finally:
        client.close()


def _local_depth(images: np.ndarray) -> np.ndarray:
    params = parameters(read_config(MODELS / "depth"))
    return load_network("depth", MODELS / "depth" / "1", params)({"IMAGE": images})["DEPTH"]


IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 64)).astype(np.float32)


def test_the_flag_reaches_tritonserver_and_the_cli():
    install = _Install(root=Path("/opt/tritonserver"), libs=Path("/opt/tritonserver/lib"))
    assert "--model-config-name=gpu" in TritonServer(_settings(MODELS, model_config_name="gpu"))._command(install)
    assert not [a for a in TritonServer(_settings(MODELS))._command(install) if a.startswith("--model-config-name")]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from_args(parser.parse_args(["--model-config-name", "gpu"])).model_config_name == "gpu"
    assert settings_from_args(parser.parse_args([])).model_config_name == ""
    with pytest.raises(InvalidInput, match="model_config_name must be letters, digits"):
        TritonSettings(model_config_name="g p u")


@pytest.mark.slow
def test_model_config_name_gpu_loads_the_gpu_config(tmp_path):
    server = TritonServer(_settings(MODELS, model_config_name=GPU_CONFIG), log_path=tmp_path / "triton.log")
    if not torch.cuda.is_available():
        with pytest.raises(Unavailable, match="kind KIND_GPU but no GPUs are available"), server:
            pass
        assert server.poll() is not None
        return
    with server:  # a GPU: the shipped depth network on cuda:0 answers as the CPU network does
        np.testing.assert_allclose(_depth(server.grpc_url, IMAGES), _local_depth(IMAGES), atol=1e-4)


@pytest.mark.slow
def test_a_model_without_a_gpu_config_keeps_its_cpu_config(tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(MODELS / "depth", repo / "depth", ignore=shutil.ignore_patterns("configs"))
    assert not config_path(repo / "depth", GPU_CONFIG).exists()
    with TritonServer(_settings(repo, model_config_name=GPU_CONFIG), log_path=tmp_path / "triton.log") as server:
        np.testing.assert_allclose(_depth(server.grpc_url, IMAGES), _local_depth(IMAGES), atol=1e-5)
