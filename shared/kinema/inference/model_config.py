"""Read a Triton model repository's `config.pbtxt` files and keep their weight hashes in sync.

Each config carries a `weights_sha256` parameter; the Triton model refuses to start when the
weights beside it hash differently, so a platform team never serves weights other than the ones
the config, the model card (`kinema.inference.model_card`) and every artifact's provenance name. A config may also
publish the network's params (`params_json`, checked against the weights the same way) for services that need them
under Triton, where a model's metadata carries nothing else. `python -m kinema.inference.model_config --sync models`
rewrites the hashes after training, in `config.pbtxt`, in every custom config and in the model card.

Custom configs (Triton's `configs/<name>.pbtxt`, chosen with `tritonserver --model-config-name=<name>`):
each model's `configs/gpu.pbtxt` is generated from its `config.pbtxt` by `gpu_config` (`--gpu-configs
models` writes them), so the GPU profile differs from the CPU one only where a GPU wants it to: one
KIND_GPU instance per GPU, larger preferred batches, no CPU thread count.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kinema.errors import NotFound
from kinema.inference.model_card import write_sha256

GPU_CONFIG = "gpu"  # tritonserver --model-config-name=gpu
# Parameters only a CPU instance reads: a GPU instance's work is on the GPU, not in torch's CPU thread pool.
CPU_ONLY_PARAMETERS = ("torch_threads", "pin_cpus")


def config_path(model_dir: Path, name: str = "") -> Path:
    """config.pbtxt, or the custom config `configs/<name>.pbtxt` Triton loads for --model-config-name=<name>."""
    return model_dir / "config.pbtxt" if not name else model_dir / "configs" / f"{name}.pbtxt"


def read_config(model_dir: Path, name: str = "") -> model_config_pb2.ModelConfig:
    path = config_path(model_dir, name)
    if not path.is_file():
        raise NotFound(f"no Triton model config at {path}")
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    if not config.name:
        config.name = model_dir.name
    return config


def gpu_config(config: model_config_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
    """The GPU variant of a CPU config: one KIND_GPU instance per GPU, preferred batches up to max_batch_size.

    Inputs, outputs and every other parameter stay as they are (the dtype stays fp32 unless a `dtype` parameter
    says otherwise); only `instance_group`, the preferred batch sizes and `CPU_ONLY_PARAMETERS` change.
    """
    gpu = model_config_pb2.ModelConfig()
    gpu.CopyFrom(config)
    del gpu.instance_group[:]
    gpu.instance_group.add(count=1, kind=model_config_pb2.ModelInstanceGroup.KIND_GPU)
    m = config.max_batch_size
    if m > 0 and config.HasField("dynamic_batching"):  # a GPU is busiest on full batches
        del gpu.dynamic_batching.preferred_batch_size[:]
        gpu.dynamic_batching.preferred_batch_size.extend(sorted({max(1, m // 4), max(1, m // 2), m}))
    for key in CPU_ONLY_PARAMETERS:
        if key in gpu.parameters:
            del gpu.parameters[key]
    return gpu


def format_config(config: model_config_pb2.ModelConfig) -> str:
    """The config as pbtxt with one line per field or entry (text_format's own output spreads one over many)."""
    lines = []
    for field, value in config.ListFields():
        name = field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            message_values = field.message_type.fields_by_name["value"].message_type is not None
            for key in sorted(value):
                part = model_config_pb2.ModelConfig()
                if message_values:
                    getattr(part, name)[key].CopyFrom(value[key])
                else:
                    getattr(part, name)[key] = value[key]
                lines.append(text_format.MessageToString(part, as_one_line=True))
        elif field.is_repeated and field.message_type is not None:
            for item in value:
                part = model_config_pb2.ModelConfig()
                getattr(part, name).add().CopyFrom(item)
                lines.append(text_format.MessageToString(part, as_one_line=True))
        else:
            part = model_config_pb2.ModelConfig()
            if field.message_type is not None:
                getattr(part, name).CopyFrom(value)
            elif field.is_repeated:
                getattr(part, name).extend(value)
            else:
                setattr(part, name, value)
            lines.append(text_format.MessageToString(part, as_one_line=True))
    text = "\n".join(lines) + "\n"
    if text_format.Parse(text, model_config_pb2.ModelConfig()) != config:
        raise AssertionError(f"{config.name}: the formatted config does not parse back to itself")
    return text


def render_gpu_config(model_dir: Path) -> str:
    """The text of `configs/gpu.pbtxt`, generated from the model's config.pbtxt."""
    header = (
        "# GENERATED from ../config.pbtxt by `python -m kinema.inference.model_config --gpu-configs models`:\n"
        "# edit config.pbtxt and rerun (tests/inference/test_gpu_configs.py fails while this file is stale).\n"
        f"# Loaded instead of config.pbtxt by `tritonserver --model-config-name={GPU_CONFIG}` (the chart's\n"
        "# triton.gpu.enabled): one KIND_GPU instance per GPU, larger preferred batches, no torch_threads;\n"
        '# fp32 unless a `dtype` parameter ("float16" / "bfloat16") is added to config.pbtxt.\n'
    )
    return header + format_config(gpu_config(read_config(model_dir)))


def write_gpu_configs(models: Path, names: Iterable[str] = ()) -> list[Path]:
    """Write `configs/gpu.pbtxt` beside the config.pbtxt of the named models (none named: every model)."""
    dirs = [models / n for n in names] if names else model_dirs(models)
    written = []
    for d in dirs:
        path = config_path(d, GPU_CONFIG)
        path.parent.mkdir(exist_ok=True)
        path.write_text(render_gpu_config(d))
        written.append(path)
    return written


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    """The config's `parameters` as plain strings (Triton passes them to model.py the same way)."""
    return {k: v.string_value for k, v in config.parameters.items()}


def latest_version(model_dir: Path) -> str:
    versions = sorted((int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    if not versions:
        raise NotFound(f"model {model_dir.name} has no numbered version folder in {model_dir}")
    return str(versions[0])


def model_dirs(models: Path) -> list[Path]:
    return sorted(p.parent for p in models.glob("*/config.pbtxt"))


_SHA_RE = re.compile(r'(key:\s*"weights_sha256"\s*value:?\s*\{\s*string_value:\s*")([0-9a-f]*)(")')
# A published params_json is one JSON text as a protobuf string literal (escaped quotes and backslashes).
_PARAMS_RE = re.compile(r'(key:\s*"params_json"\s*value:?\s*\{\s*string_value:\s*)("(?:[^"\\]|\\.)*")')


def sync_hashes(models: Path) -> dict[str, str]:
    """Load every network once, write its weights' SHA-256 (and, where the config publishes them, its params)
    into its configs and its model card (`kinema.inference.model_card`); returns {model: sha}."""
    from kinema.inference.networks import load_network

    written = {}
    for d in model_dirs(models):
        config = read_config(d)
        params = parameters(config)
        if "weights_sha256" not in params:
            continue
        del params["weights_sha256"]  # the hash and the params are stale until this rewrites them: load unchecked
        published = params.pop("params_json", None)
        network = load_network(params.get("network", d.name), d / latest_version(d), params)
        sha = network.sha256
        gpu = config_path(d, GPU_CONFIG)
        # Every config Triton may load for this model; the generated GPU config is generated again below.
        for path in [d / "config.pbtxt", *(p for p in sorted(d.glob("configs/*.pbtxt")) if p != gpu)]:
            text, n = _SHA_RE.subn(lambda m, sha=sha: m.group(1) + sha + m.group(3), path.read_text())
            if n != 1:
                raise ValueError(f"{path}: expected one weights_sha256 parameter, found {n}")
            if published is not None:
                literal = json.dumps(json.dumps(json.loads(network.params_json), sort_keys=True))  # ASCII, escaped
                text, n = _PARAMS_RE.subn(lambda m, v=literal: m.group(1) + v, text)
                if n != 1:
                    raise ValueError(f"{path}: expected one params_json parameter, found {n}")
            path.write_text(text)
        if gpu.is_file():
            gpu.write_text(render_gpu_config(d))
        write_sha256(d, sha)
        written[d.name] = network.sha256
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Keep a Triton model repository's configs in step with its weights")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--sync", type=Path, metavar="MODELS",
                      help="write each model's weights SHA-256 into its configs and model card")  # fmt: skip
    what.add_argument("--gpu-configs", type=Path, metavar="MODELS",
                      help="write each model's configs/gpu.pbtxt from its config.pbtxt")  # fmt: skip
    ap.add_argument("--model", dest="names", action="append", default=[], metavar="NAME",
                    help="with --gpu-configs: only this model (repeatable; default: every model)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.gpu_configs:
        for path in write_gpu_configs(args.gpu_configs, args.names):
            print(path)
        return
    for name, sha in sync_hashes(args.sync).items():
        print(f"{name}: {sha}")


if __name__ == "__main__":
    main()
