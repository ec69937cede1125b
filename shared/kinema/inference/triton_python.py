"""The glue every Triton python-backend `model.py` shares: config in, numpy out, one response each.

Kept here so each `models/<name>/1/model.py` stays initialize / execute / finalize only. Per-request
errors go into that request's response (never an exception out of `execute`); their message
starts with the gRPC status name so the calling service can map it back (`TritonRunner`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kinema.errors import InvalidInput
from kinema.inference.networks import Network, load_network, run_batch

_LOGGER = logging.getLogger(__name__)


def build(network_kind: str, args: dict) -> Network:
    """Build the network from Triton's `initialize` args, verifying the configured weights hash."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    threads = int(params.get("torch_threads", "0"))
    if threads > 0:  # this stub process is the model instance: its thread count is ours to set
        import torch

        torch.set_num_threads(threads)
    version_dir = Path(args["model_repository"]) / args["model_version"]
    network = load_network(params.get("network", network_kind), version_dir, params)
    want = params.get("weights_sha256", "")
    if want and want != network.sha256:
        raise ValueError(
            f"{config['name']}: weights hash {network.sha256} != config weights_sha256 {want}; "
            "run `python -m kinema.inference.model_config --sync MODELS` after changing weights"
        )
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
