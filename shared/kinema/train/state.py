"""Resumable training state in safetensors: model, EMA and AdamW moments, counters in metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def save_train_state(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, counters: dict, ema: nn.Module | None = None
) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"opt.{names[id(p)]}.{key}"] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp),
              metadata={"counters": json.dumps(counters)})  # fmt: skip
    tmp.replace(path)  # a crash mid-write never leaves a half checkpoint


def load_train_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, ema: nn.Module | None = None) -> dict:
    """Restore what `save_train_state` wrote; returns its counters."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        if k.startswith("opt."):
            name, key = k[4:].rsplit(".", 1)
            opt.state[params[name]][key] = v
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["counters"])


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    # One fused update over all tensors (the same lerp per tensor; far fewer kernel launches on a GPU).
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
