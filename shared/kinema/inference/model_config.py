"""Read a Triton model repository's `config.pbtxt` files and keep their weight hashes in sync.

Each config carries a `weights_sha256` parameter; the Triton model refuses to start when the
weights beside it hash differently, so a platform team never serves weights other than the ones
the config (and every artifact's provenance) names. `python -m kinema.inference.model_config
--sync models` rewrites the hashes after training.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kinema.errors import NotFound


def read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise NotFound(f"no Triton model config at {path}")
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    if not config.name:
        config.name = model_dir.name
    return config


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


def sync_hashes(models: Path) -> dict[str, str]:
    """Load every network once, write its weights' SHA-256 into its config; returns {model: sha}."""
    from kinema.inference.networks import load_network

    written = {}
    for d in model_dirs(models):
        config = read_config(d)
        params = parameters(config)
        if "weights_sha256" not in params:
            continue
        network = load_network(params.get("network", d.name), d / latest_version(d), params)
        path = d / "config.pbtxt"
        sha = network.sha256
        text, n = _SHA_RE.subn(lambda m, sha=sha: m.group(1) + sha + m.group(3), path.read_text())
        if n != 1:
            raise ValueError(f"{path}: expected one weights_sha256 parameter, found {n}")
        path.write_text(text)
        written[d.name] = network.sha256
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write each model's weights SHA-256 into its config.pbtxt")
    ap.add_argument("--sync", type=Path, required=True, metavar="MODELS", help="model repository folder")
    args = ap.parse_args(argv)
    for name, sha in sync_hashes(args.sync).items():
        print(f"{name}: {sha}")


if __name__ == "__main__":
    main()
