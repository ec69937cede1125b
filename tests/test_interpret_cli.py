"""`kinema interpret analyze|edit` on this machine (the shipped iin_factor and autoencoder, in process).

The same commands through the service (`--service`) are tested in tests/services/test_interpret_service.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kinema.cli import main
from kinema.data.scene import COLOUR_NAMES
from kinema.train.iin import render_single_objects

N = 6


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> tuple[list[Path], list[str]]:
    """PNG files of the first test-split single-object renders and their true colours."""
    folder = tmp_path_factory.mktemp("renders")
    raw = render_single_objects("test", 0, N)
    paths = [folder / f"render-{i}.png" for i in range(N)]
    for image, path in zip(raw["images"], paths, strict=True):
        Image.fromarray(image).save(path)
    return paths, [COLOUR_NAMES[c] for c in raw["colour"]]


def _colours(capsys, paths: list[Path]) -> list[str]:
    assert main(["interpret", "analyze", *map(str, paths), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    return [r["factors"]["colour"]["value"] for r in rows]


def test_analyze_prints_each_factor_with_its_value_and_scores(renders, capsys):
    paths, truth = renders
    assert main(["interpret", "analyze", str(paths[0])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{paths[0]}:"
    assert [line.split()[0] for line in lines[1:]] == ["colour", "shape", "position", "size"]
    assert lines[1].split()[1] == truth[0]
    score = float(lines[1].split()[2])
    assert 0 < score <= 1


def test_analyze_reads_the_colour_of_most_renders(renders, capsys):
    paths, truth = renders
    got = _colours(capsys, paths)
    assert sum(a == b for a, b in zip(got, truth, strict=True)) > N // 2, (got, truth)


def test_edit_writes_an_image_analyze_reads_as_the_new_colour(renders, tmp_path, capsys):
    paths, truth = renders
    outs = []
    for i, path in enumerate(p for p, c in zip(paths, truth, strict=True) if c != "red"):
        out = tmp_path / f"red-{i}.png"
        assert main(["interpret", "edit", str(path), "--set", "colour=red", "-o", str(out)]) == 0
        assert capsys.readouterr().out.strip() == str(out)
        image = Image.open(out)
        assert image.size == (64, 64) and json.loads(image.text["parameters"])["set"] == {"colour": "red"}
        outs.append(out)
    got = _colours(capsys, outs)
    assert sum(c == "red" for c in got) >= len(outs) - 1, got


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "colour=pink"], "one of: red, yellow, green, cyan, blue, purple"),
        (["--set", "hue=blue"], "its factors: colour, shape, position, size"),
        (["--set", "colour=blue", "--model", "iin_net2net"], "use Translate"),
        (["--set", "colour=blue", "--model", "iin_nothing"], "iin_nothing"),
        (["--set", "colour=blue", "-o", "out.jpg"], ".png"),
        (["--set", "colour=red", "--set", "colour=blue"], "more than once"),
    ],
)
def test_bad_edits_give_a_clear_message(renders, tmp_path, args, message, capsys):
    code = main(["interpret", "edit", str(renders[0][0]), "-o", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o.png").exists()


def test_bad_images_give_a_clear_message(tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_bytes(b"not an image at all")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(small)
    for path, message in ((text, str(text)), (small, "64x64"), (tmp_path / "missing.png", "missing.png")):
        assert main(["interpret", "analyze", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        main(["interpret", "edit", str(small), "--set", "colour"])
    assert e.value.code == 2 and "FACTOR=VALUE" in capsys.readouterr().err
