"""Result files and learning curves round-trip."""

from __future__ import annotations

import json

import pytest

from kinema.eval.report import append_curve, curve_markdown, read_curve, read_results, write_results


def test_write_results_round_trip(tmp_path) -> None:
    results = {"fid": 12.3456789, "probe": {"colour_shape": 0.99, "relation": None}, "psnr": float("inf")}
    json_path, md_path = write_results(tmp_path / "runs" / "eval-1", results, "python -m kinema.eval --n 8")
    assert json_path.name == "eval-1.json" and md_path.name == "eval-1.md"
    doc = read_results(tmp_path / "runs" / "eval-1")
    assert doc["results"]["fid"] == results["fid"]
    assert doc["results"]["probe"] == results["probe"]
    assert doc["command"] == "python -m kinema.eval --n 8"
    assert doc["timestamp_utc"].endswith("Z") and "python" in doc["machine"]
    md = md_path.read_text()
    assert "| fid | 12.35 |" in md and "| probe.colour_shape | 0.99 |" in md and "| psnr | inf |" in md
    assert "| probe.relation | — |" in md
    assert "python -m kinema.eval --n 8" in md and doc["timestamp_utc"] in md


def test_curve_appends_and_renders(tmp_path) -> None:
    path = tmp_path / "curve.jsonl"
    append_curve(path, {"samples_seen": 1000, "accuracy": 0.5})
    append_curve(path, {"samples_seen": 2000, "accuracy": 0.75, "fid": 40.0})
    assert [json.loads(line)["samples_seen"] for line in path.read_text().splitlines()] == [1000, 2000]
    assert read_curve(path)[1]["fid"] == 40.0
    md = curve_markdown(path).splitlines()
    assert md[0] == "| samples_seen | accuracy | fid |"
    assert md[2] == "| 1000 | 0.5 | — |"
    assert md[3] == "| 2000 | 0.75 | 40 |"


def test_empty_curve_point_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError):
        append_curve(tmp_path / "c.jsonl", {})
