"""Model cards: how a shipped network was made and what it scores, beside its weights."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path


def hardware() -> str:
    from kinema.eval.report import machine_info

    m = machine_info()
    return f"{m['cpu_model']}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} threads)" + (
        f", GPU {m['gpu']}" if "gpu" in m else ""
    )


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
