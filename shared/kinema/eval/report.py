"""Writing evaluation results: a JSON + markdown pair per run, and learning curves as JSONL."""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What ran the evaluation: enough to tell whose numbers are comparable."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def flatten(results: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys ({"fid": {"test": 3}} -> {"fid.test": 3})."""
    out: dict[str, Any] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return str(value) if math.isinf(value) or math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(format_value(r.get(c)) for c in columns) + " |" for r in rows) + "\n"


def write_results(path_stem: str | Path, results: dict[str, Any], command: str) -> tuple[Path, Path]:
    """Write `<stem>.json` (results, command, UTC time, machine) and `<stem>.md` (the same as a table)."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    machine = machine_info()
    doc = {"results": results, "command": command, "timestamp_utc": now, "machine": machine}
    json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    rows = [{"metric": k, "value": v} for k, v in flatten(results).items()]
    md = (
        f"# {stem.name}\n\n"
        + markdown_table(rows, ["metric", "value"])
        + f"\nCommand:\n\n```\n{command}\n```\n\nUTC: {now}\n\n"
        + "Machine: "
        + ", ".join(f"{k} {v}" for k, v in machine.items())
        + "\n"
    )
    md_path.write_text(md)
    return json_path, md_path


def read_results(path_stem: str | Path) -> dict[str, Any]:
    """The document `write_results` wrote: {"results", "command", "timestamp_utc", "machine"}."""
    stem = Path(path_stem)
    return json.loads(stem.with_name(stem.name + ".json").read_text())


def append_curve(path: str | Path, point: dict[str, Any]) -> None:
    """Append one learning-curve point (e.g. samples_seen, accuracy, fid) as a JSON line."""
    if not point:
        raise ValueError("a curve point needs at least one value")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(point, default=str) + "\n")


def read_curve(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def curve_markdown(path: str | Path) -> str:
    """The curve as a markdown table; columns are every key seen, in order of first appearance."""
    points = read_curve(path)
    columns: list[str] = []
    for p in points:
        columns += [k for k in p if k not in columns]
    return markdown_table(points, columns) if points else ""
