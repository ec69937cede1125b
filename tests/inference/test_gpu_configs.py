"""The GPU profile of the model repository: each served model's `configs/gpu.pbtxt` (Triton's custom model
configuration, `tritonserver --model-config-name=gpu`) is generated from its config.pbtxt and differs from it only in
where and how much it batches, so the two cannot drift."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kinema.inference.model_config import (
    CPU_ONLY_PARAMETERS,
    GPU_CONFIG,
    config_path,
    format_config,
    gpu_config,
    model_dirs,
    parameters,
    read_config,
    render_gpu_config,
    sync_hashes,
)
from kinema.rpc.process import SERVED_MODELS

MODELS = Path(__file__).resolve().parents[2] / "models"
WITH_GPU_CONFIG = sorted(
    {*SERVED_MODELS, *(d.name for d in model_dirs(MODELS) if config_path(d, GPU_CONFIG).is_file())}
)
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


@pytest.mark.parametrize("name", SERVED_MODELS)  # what the stack and the chart serve
def test_every_served_model_has_a_gpu_config(name):
    assert config_path(MODELS / name, GPU_CONFIG).is_file(), (
        f"models/{name}/configs/gpu.pbtxt is missing: python -m kinema.inference.model_config --gpu-configs models "
        f"--model {name}"
    )


@pytest.mark.parametrize("name", WITH_GPU_CONFIG)
def test_gpu_config_is_the_one_generated_from_config_pbtxt(name):
    checked_in = config_path(MODELS / name, GPU_CONFIG).read_text()
    assert checked_in == render_gpu_config(MODELS / name), (
        f"models/{name}/configs/gpu.pbtxt is stale: python -m kinema.inference.model_config --gpu-configs models "
        f"--model {name}"
    )


@pytest.mark.parametrize("name", WITH_GPU_CONFIG)
def test_gpu_config_serves_the_same_model_on_one_gpu_with_larger_batches(name):
    cpu, gpu = read_config(MODELS / name), read_config(MODELS / name, GPU_CONFIG)
    # The same model: name, backend, tensors, batch limit and every parameter but the CPU's thread count.
    assert (gpu.name, gpu.backend, gpu.max_batch_size) == (cpu.name, cpu.backend, cpu.max_batch_size)
    assert list(gpu.input) == list(cpu.input) and list(gpu.output) == list(cpu.output)
    cpu_params = {k: v for k, v in parameters(cpu).items() if k not in CPU_ONLY_PARAMETERS}
    assert parameters(gpu) == cpu_params
    assert not set(CPU_ONLY_PARAMETERS) & set(parameters(gpu))
    assert parameters(gpu).get("dtype", "float32") == "float32"  # fp32 unless config.pbtxt asks for less
    rest = [f.name for f, _ in cpu.ListFields() if f.name not in ("instance_group", "dynamic_batching")]
    for field in rest:
        if field != "parameters":
            assert getattr(gpu, field) == getattr(cpu, field), field
    # Placement and batching: one instance per GPU, preferred batches beyond the CPU's, within max_batch_size.
    assert [(g.kind, g.count, list(g.gpus)) for g in gpu.instance_group] == [(KIND_GPU, 1, [])]
    preferred = list(gpu.dynamic_batching.preferred_batch_size)
    assert preferred == sorted(preferred) and preferred[-1] == gpu.max_batch_size
    assert preferred[-1] > max(cpu.dynamic_batching.preferred_batch_size, default=1)
    assert gpu.dynamic_batching.max_queue_delay_microseconds == cpu.dynamic_batching.max_queue_delay_microseconds


@pytest.mark.parametrize("model_dir", model_dirs(MODELS), ids=lambda d: d.name)
def test_the_compact_format_parses_back_to_the_same_config(model_dir):
    config = read_config(model_dir)
    assert text_format.Parse(format_config(config), model_config_pb2.ModelConfig()) == config
    assert gpu_config(config) != config and gpu_config(gpu_config(config)) == gpu_config(config)


def test_sync_writes_the_weights_hash_into_the_gpu_config_too(tmp_path):
    shutil.copytree(MODELS / "depth", tmp_path / "depth")
    want = parameters(read_config(MODELS / "depth"))["weights_sha256"]
    for path in (tmp_path / "depth" / "config.pbtxt", config_path(tmp_path / "depth", GPU_CONFIG)):
        path.write_text(path.read_text().replace(want, "0" * 64))
    assert sync_hashes(tmp_path) == {"depth": want}
    assert parameters(read_config(tmp_path / "depth", GPU_CONFIG))["weights_sha256"] == want
    synced, shipped = (config_path(root / "depth", GPU_CONFIG).read_text() for root in (tmp_path, MODELS))
    assert synced == shipped
