"""The glue every Triton python-backend `model.py` shares: config in, numpy out, one response each.

Kept here so each `models/<name>/1/model.py` stays initialize / execute / finalize only. Per-request
errors go into that request's response (never an exception out of `execute`); their message
starts with the gRPC status name so the calling service can map it back (`TritonRunner`).

Where an instance runs is Triton's to say: `instance_group { kind: KIND_GPU }` (the `configs/gpu.pbtxt`
of each model, selected with `tritonserver --model-config-name=gpu`) puts it on `cuda:<device id>`,
KIND_CPU on the CPU, where a model whose config sets `pin_cpus` keeps each instance on cores of its own when the
server allows it (`pinned_cpus`). The compute dtype is fp32 unless the config's `dtype` parameter says otherwise
(float16 / bfloat16, GPU only: on a CPU without AVX-512/AMX they run about 100x slower, RECIPES.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from kinema.errors import InvalidInput, Unavailable
from kinema.inference.allocator import retain_freed_memory
from kinema.inference.networks import Network, load_network, run_batch
from kinema.tritonserver import PIN_CPUS_SETTING

_LOGGER = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    """Where one model instance computes: a torch device and the dtype of its float tensors."""

    device: torch.device
    dtype: torch.dtype = torch.float32


def placement(args: dict, params: dict[str, str], cuda_available: bool | None = None) -> Placement:
    """The device Triton gave this instance (`model_instance_kind`, `model_instance_device_id`) and the config's dtype.

    KIND_GPU -> `cuda:<device id>`; KIND_CPU (and KIND_MODEL, where the model decides) -> the CPU. Raises
    `Unavailable` for a GPU instance where torch has no CUDA (or not that device), `InvalidInput` for a dtype
    this device cannot serve. `cuda_available` defaults to `torch.cuda.is_available()`.
    """
    name = args.get("model_name", "model")
    kind = str(args.get("model_instance_kind", "CPU")).upper()
    dtype_name = params.get("dtype", "") or "float32"
    if dtype_name not in DTYPES:
        raise InvalidInput(f"{name}: parameter dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    dtype = DTYPES[dtype_name]
    if kind in ("CPU", "MODEL"):
        if dtype != torch.float32:
            raise InvalidInput(
                f"{name}: dtype {dtype_name} needs a KIND_GPU instance; on the CPU Kinema serves float32 only"
            )
        return Placement(torch.device("cpu"), dtype)
    if kind != "GPU":
        raise InvalidInput(f"{name}: unsupported instance kind {kind!r} (KIND_CPU or KIND_GPU)")
    device_id = int(args.get("model_instance_device_id", "0") or 0)
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise Unavailable(
            f"{name}: the instance is KIND_GPU (device {device_id}) but torch {torch.__version__} here has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}); install a CUDA build of torch in the Triton image "
            "(services/triton/Dockerfile, TORCH_INDEX_URL) or serve the CPU configs (no --model-config-name=gpu)"
        )
    count = torch.cuda.device_count()
    if device_id >= count:
        raise Unavailable(f"{name}: Triton gave GPU {device_id}, but torch sees {count} CUDA device(s)")
    return Placement(torch.device("cuda", device_id), dtype)


def instance_ordinal(config: dict, instance_name: str) -> int | None:
    """The instance's place among all of the model's instances, counting through its instance groups in order
    (Triton names an instance `<group name>_<index in group>`); None for a name no group gives."""
    before = 0
    for group in config.get("instance_group", []):
        name, count = group.get("name", ""), int(group.get("count", 1))
        prefix, _, index = instance_name.rpartition("_")
        if name and prefix == name and index.isdigit() and int(index) < count:
            return before + int(index)
        before += count
    return None


def pinned_cpus(config: dict, instance_name: str, threads: int, allowed: Iterable[int], enabled: bool) -> list[int]:
    """The CPUs a CPU instance keeps to, or [] to leave its placement to the OS.

    Pinned only where the model's config asks (parameter `pin_cpus: "true"`) and whoever started Triton allows it
    (`enabled`: KINEMA_TRITON_PIN_CPUS=1, when the machine's cores are the server's: `kinema triton`, the local
    stack, a pod with exclusive cores). Instance k takes `threads` of the `allowed` CPUs, from the k x threads-th
    on, wrapping around. Left to the OS, the denoiser's stub, woken once per step, moved between cores and ran its
    forward passes about 5% slower than the same network in a process that stays put (docs/serving.md).
    """
    asked = config.get("parameters", {}).get("pin_cpus", {}).get("string_value", "").lower()
    if asked not in ("", "true", "false"):
        name = config.get("name", "model")
        raise InvalidInput(f"{name}: parameter pin_cpus must be 'true' or 'false', got {asked!r}")
    cpus = sorted(allowed)
    ordinal = instance_ordinal(config, instance_name)
    if not enabled or asked != "true" or ordinal is None or not cpus:
        return []
    return sorted({cpus[(ordinal * threads + j) % len(cpus)] for j in range(threads)})


def build(network_kind: str, args: dict) -> Network:
    """Build the network from Triton's `initialize` args on its instance's device; weights other than the ones its
    config and model card name are refused (`kinema.inference.model_card.check_weights`). The stub process keeps the
    memory a pass frees for the next one (`kinema.inference.allocator`)."""
    retain_freed_memory()
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    where = placement({"model_name": config.get("name", network_kind)} | args, params)
    threads = int(params.get("torch_threads", "0"))
    if where.device.type == "cpu":  # before torch starts its threads, which take this process's CPUs
        instance = args.get("model_instance_name", "")
        enabled = os.environ.get(PIN_CPUS_SETTING, "") == "1"
        cpus = pinned_cpus(config, instance, max(threads, 1), os.sched_getaffinity(0), enabled)
        try:
            if cpus:
                os.sched_setaffinity(0, cpus)
                _LOGGER.info("%s keeps to CPU %s", instance, ",".join(map(str, cpus)))
        except OSError as e:  # a sandbox that forbids it: the instance still serves, placed by the kernel
            _LOGGER.warning("%s could not keep to CPU %s (%s); left to the kernel", instance, cpus, e)
    if threads > 0:  # this stub process is the model instance: its thread count is ours to set
        torch.set_num_threads(threads)
    version_dir = Path(args["model_repository"]) / args["model_version"]
    network = load_network(params.get("network", network_kind), version_dir, params)  # checks the weights' hash
    if where.device.type != "cpu" or where.dtype != torch.float32:
        network.to(where.device, where.dtype)
    dtype = str(where.dtype).removeprefix("torch.")
    _LOGGER.info("%s on %s (%s)", config.get("name", network_kind), where.device, dtype)
    return network


def execute(network: Network, requests: list, pb_utils) -> list:
    """One InferenceResponse per request, in order; a bad request gets its error, the rest run batched."""
    decoded = []
    for request in requests:
        inputs = {}
        for spec in network.inputs:
            t = pb_utils.get_input_tensor_by_name(request, spec.name)
            if t is not None:
                inputs[spec.name] = t.as_numpy()
        decoded.append(inputs)
    responses = []
    for result in run_batch(network, decoded):
        if isinstance(result, dict):
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in result.items()]))
            continue
        if isinstance(result, InvalidInput):
            message, code = f"INVALID_ARGUMENT: {result}", "INVALID_ARG"
        else:
            _LOGGER.error("%s failed: %r", network.name, result)
            message, code = f"INTERNAL: {network.name} failed ({type(result).__name__})", "INTERNAL"
        try:
            error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
        except (AttributeError, TypeError):  # backends before error codes
            error = pb_utils.TritonError(message)
        responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
    return responses


# Every model.py in the repository is the same file with its network name (models/vae_encoder/1/model.py).
MODEL_PY = '''"""Triton python-backend model: the {network} network from kinema.inference.networks.

initialize / execute / finalize only; the numpy-level network and the request glue live once in
the library (kinema.inference), shared with in-process serving. Every model.py in this repository
is this same file with its network name (deliberate: Triton needs one per model folder).
"""

import triton_python_backend_utils as pb_utils

from kinema.inference import triton_python

NETWORK = "{network}"


class TritonPythonModel:
    def initialize(self, args):
        self.network = triton_python.build(NETWORK, args)

    def execute(self, requests):
        return triton_python.execute(self.network, requests, pb_utils)

    def finalize(self):
        self.network = None
'''


def write_model_py(folder: Path, network: str) -> Path:
    """`folder/1/model.py` for a model run by `network` (a name in kinema.inference.networks.NETWORKS)."""
    path = folder / "1" / "model.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MODEL_PY.format(network=network), encoding="utf-8")
    return path
