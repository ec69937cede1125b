"""The python-backend glue's device logic, on the CPU: where Triton's instance kind puts a network, what a GPU
instance without CUDA says, and networks computing in another dtype still answering float32 numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format

from kinema.errors import InvalidInput, Unavailable
from kinema.inference import triton_python
from kinema.inference.model_config import read_config
from kinema.inference.networks import load_network
from kinema.inference.triton_python import Placement, placement

MODELS = Path(__file__).resolve().parents[2] / "models"
CPU = torch.device("cpu")


def triton_args(model: str, kind: str, device_id: str = "0", config_name: str = "") -> dict:
    """What Triton's python backend hands `initialize` (model_config as JSON, the instance's kind and device)."""
    config = json_format.MessageToDict(read_config(MODELS / model, config_name), preserving_proto_field_name=True)
    return {"model_config": json.dumps(config), "model_name": model, "model_instance_kind": kind,
            "model_instance_device_id": device_id, "model_repository": str(MODELS / model),
            "model_version": "1"}  # fmt: skip


def test_cpu_instances_run_on_the_cpu_in_fp32():
    assert placement({"model_instance_kind": "CPU", "model_instance_device_id": "0"}, {}) == Placement(CPU)
    assert placement({"model_instance_kind": "MODEL"}, {"dtype": "float32"}) == Placement(CPU, torch.float32)
    assert placement({}, {}) == Placement(CPU)  # a backend that names no kind


def test_gpu_instances_run_on_their_device_in_the_configured_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = {"model_instance_kind": "GPU", "model_instance_device_id": "1"}
    assert placement(args, {}, cuda_available=True) == Placement(torch.device("cuda", 1), torch.float32)
    assert placement(args, {"dtype": "bfloat16"}, cuda_available=True).dtype == torch.bfloat16
    with pytest.raises(Unavailable, match="Triton gave GPU 2, but torch sees 2 CUDA device"):
        placement(args | {"model_instance_device_id": "2"}, {}, cuda_available=True)


def test_a_gpu_instance_without_cuda_fails_with_what_to_do():
    args = {"model_name": "denoiser", "model_instance_kind": "GPU", "model_instance_device_id": "0"}
    with pytest.raises(Unavailable) as e:
        placement(args, {}, cuda_available=False)
    message = str(e.value)
    assert message.startswith("denoiser: the instance is KIND_GPU (device 0) but torch")
    assert "has no CUDA" in message and "--model-config-name=gpu" in message and "TORCH_INDEX_URL" in message


@pytest.mark.parametrize(
    ("args", "params", "message"),
    [
        ({"model_instance_kind": "CPU"}, {"dtype": "float16"}, "dtype float16 needs a KIND_GPU instance"),
        ({"model_instance_kind": "CPU"}, {"dtype": "fp8"}, "dtype must be one of float32, float16, bfloat16"),
        ({"model_instance_kind": "TPU"}, {}, "unsupported instance kind 'TPU'"),
    ],
)
def test_what_an_instance_cannot_serve_is_refused(args, params, message):
    with pytest.raises(InvalidInput, match=message):
        placement(args, params, cuda_available=False)


def test_build_keeps_a_cpu_instance_as_it_was_and_refuses_a_gpu_one_without_cuda(monkeypatch):
    threads = torch.get_num_threads()
    try:
        network = triton_python.build("depth", triton_args("depth", "CPU"))
        assert network.device == CPU and network.dtype == torch.float32
        assert all(p.device == CPU and p.dtype == torch.float32 for p in network.model.parameters())
        assert torch.get_num_threads() == 1  # config.pbtxt's torch_threads, as before
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Unavailable, match="depth: the instance is KIND_GPU"):
        triton_python.build("depth", triton_args("depth", "GPU", config_name="gpu"))


def test_a_network_in_another_dtype_takes_and_gives_float32_numpy(tiny_models):
    """bf16 on this CPU is slow but exact enough to show the casts: inputs to the compute dtype, outputs to float32."""
    network = load_network("vae_decoder", tiny_models / "vae_decoder" / "1", {})
    latents = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    want = network({"LATENT": latents})["IMAGE"]
    network.to(CPU, torch.bfloat16)
    assert next(network.model.parameters()).dtype == torch.bfloat16
    got = network({"LATENT": latents})["IMAGE"]
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() < 0.1 * max(1.0, np.abs(want).max())
    network.to(CPU, torch.float32)
    np.testing.assert_allclose(network({"LATENT": latents})["IMAGE"], want, atol=1e-2)


def _groups(*counts: int, pin: str = "true") -> dict:
    """A normalized config as Triton hands it to `initialize`: named instance groups, the pin_cpus parameter."""
    groups = [{"name": f"denoiser_{g}", "count": c, "kind": "KIND_CPU"} for g, c in enumerate(counts)]
    return {"name": "denoiser", "parameters": {"pin_cpus": {"string_value": pin}}, "instance_group": groups}


def test_instances_count_through_their_groups_in_order():
    config = _groups(2, 1)
    ordinals = [triton_python.instance_ordinal(config, n) for n in ("denoiser_0_0", "denoiser_0_1", "denoiser_1_0")]
    assert ordinals == [0, 1, 2]
    for unknown in ("denoiser_1_1", "denoiser_2_0", "other_0_0", "denoiser_0_x", ""):
        assert triton_python.instance_ordinal(config, unknown) is None


def test_each_instance_keeps_to_cpus_of_its_own_where_the_config_asks_and_the_server_allows():
    config = _groups(1, 1)
    cpus = {0, 1, 2, 3}
    assert triton_python.pinned_cpus(config, "denoiser_0_0", 1, cpus, enabled=True) == [0]
    assert triton_python.pinned_cpus(config, "denoiser_1_0", 1, cpus, enabled=True) == [1]
    assert triton_python.pinned_cpus(config, "denoiser_1_0", 2, cpus, enabled=True) == [2, 3]  # two threads each
    assert triton_python.pinned_cpus(config, "denoiser_1_0", 1, {4, 6}, enabled=True) == [6]  # a cpuset's own CPUs
    assert triton_python.pinned_cpus(_groups(3), "denoiser_0_2", 1, {0, 1}, enabled=True) == [0]  # more than cores
    assert triton_python.pinned_cpus(_groups(1), "denoiser_0_0", 3, {0, 1}, enabled=True) == [0, 1]
    # left to the OS: not allowed by the server, not asked by the config, an instance no group names
    assert triton_python.pinned_cpus(config, "denoiser_0_0", 1, cpus, enabled=False) == []
    assert triton_python.pinned_cpus(_groups(1, 1, pin="false"), "denoiser_0_0", 1, cpus, enabled=True) == []
    assert triton_python.pinned_cpus({"instance_group": config["instance_group"]}, "denoiser_0_0", 1, cpus,
                                     enabled=True) == []  # fmt: skip
    assert triton_python.pinned_cpus(config, "denoiser_5_0", 1, cpus, enabled=True) == []
    with pytest.raises(InvalidInput, match="denoiser: parameter pin_cpus must be 'true' or 'false', got 'yes'"):
        triton_python.pinned_cpus(_groups(1, pin="yes"), "denoiser_0_0", 1, cpus, enabled=False)  # a typo, even off


def test_the_shipped_denoiser_asks_for_pinning_and_its_gpu_profile_does_not():
    cpu, gpu = (json.loads(triton_args("denoiser", kind, config_name=name)["model_config"])
                for kind, name in (("CPU", ""), ("GPU", "gpu")))  # fmt: skip
    assert cpu["parameters"]["pin_cpus"]["string_value"] == "true"
    assert "pin_cpus" not in gpu["parameters"]


def test_build_pins_the_instance_before_torch_starts_and_serves_where_pinning_is_refused(monkeypatch):
    args = triton_args("denoiser", "CPU")
    config = json.loads(args["model_config"])
    for g, group in enumerate(config["instance_group"]):  # the names Triton gives unnamed groups
        group["name"] = f"denoiser_{g}"
    args |= {"model_config": json.dumps(config), "model_instance_name": "denoiser_1_0"}
    monkeypatch.setenv("KINEMA_TRITON_PIN_CPUS", "1")
    monkeypatch.setattr(triton_python.os, "sched_getaffinity", lambda pid: {4, 5, 6})
    calls = []
    monkeypatch.setattr(triton_python.os, "sched_setaffinity", lambda pid, cpus: calls.append((pid, cpus)))
    threads = torch.get_num_threads()
    try:
        assert triton_python.build("denoiser", args).sha256
        assert calls == [(0, [5])]  # the second instance, on the second of the CPUs Triton may use

        def refused(pid, cpus):
            raise PermissionError("not here")

        monkeypatch.setattr(triton_python.os, "sched_setaffinity", refused)
        assert triton_python.build("denoiser", args).sha256  # serves all the same, placed by the kernel
    finally:
        torch.set_num_threads(threads)
