"""Safetensors checkpoints: loading (never pickle), saving with params, content hashes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

P = TypeVar("P")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's *.safetensors files (sharded checkpoints included)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder} (pickle checkpoints are not loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], params: Any, extra: dict | None = None) -> None:
    """Write `state` with the params dataclass (and extras) as JSON metadata, atomically."""
    meta = {"params": dataclasses.asdict(params), "params_type": type(params).__name__, **(extra or {})}
    meta = {k: json.dumps(v) for k, v in meta.items()}  # every value is JSON, see `read_metadata`
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def read_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return {k: _json_or_text(v) for k, v in raw.items()}


def _json_or_text(value: str) -> Any:
    """Kinema writes JSON values; other writers (diffusers, safetensors tools) write plain text."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def params_from_metadata(path: Path, cls: type[P]) -> P:
    """Rebuild the frozen params dataclass saved by `save_checkpoint` (lists become tuples)."""
    meta = read_metadata(path)
    if "params" not in meta:
        raise ValueError(f"{path} has no params metadata; was it written by kinema?")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
    return cls(**kwargs)
