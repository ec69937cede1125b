"""Model cards: how a shipped network was made and what it scores, beside its weights."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path


def hardware() -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import os

    import torch

    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), {platform.system()}"


def write_model_card(folder: Path, title: str, command: str, card: dict, notes: str = "") -> Path:
    """Write `folder/README.md` with the command, seed, data, time, hardware and metrics in `card`."""
    lines = [f"# {title}", "", "Reproduce:", "", "```", command, "```", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["| field | value |", "| --- | --- |"]
    for key, value in card.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        lines.append(f"| {key} | `{text}` |" if isinstance(value, dict | list) else f"| {key} | {text} |")
    lines += ["", f"Hardware: {hardware()}", "", f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.", ""]
    path = folder / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
