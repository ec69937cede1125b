import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kinema.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_generate_writes_png_with_provenance(tiny_models: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "img.png"
    code = main(["generate", "a red sphere left of a blue cube", "--steps", "2", "--seed", "3",
                 "--models", str(tiny_models), "-o", str(out), "-q"])  # fmt: skip
    assert code == 0 and out.exists()
    img = Image.open(out)
    assert img.size == (64, 64)
    assert img.text["prompt"] == "a red sphere left of a blue cube"
    assert img.text["seed"] == "3"
    assert json.loads(img.text["parameters"])["steps"] == 2
    assert set(json.loads(img.text["models"])) == {"text_encoder", "denoiser", "autoencoder"}
    assert not list(tmp_path.glob("*.part"))


def test_generate_n_images(tiny_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    assert (
        main(["generate", "a cube", "--n", "2", "--steps", "1", "--models", str(tiny_models), "-o", str(out), "-q"])
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0.png", "x-1.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "60"], "multiple of 8"),
        (["--size", "0"], "multiple of 8"),
        (["--steps", "0"], "must be >= 1"),
        (["--guidance", "-2"], "finite number >= 0"),
        (["--n", "0"], "must be >= 1"),
    ],
)
def test_bad_arguments_give_a_clear_message(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cube", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_weights_is_a_clear_error(tmp_path: Path, capsys) -> None:
    code = main(["generate", "a cube", "--models", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing weights" in err and "make weights" in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_empty_prompt_and_bad_suffix(tiny_models: Path, tmp_path: Path, capsys) -> None:
    assert main(["generate", "  ", "--models", str(tiny_models)]) == 2
    assert main(["generate", "a cube", "--models", str(tiny_models), "-o", str(tmp_path / "a.jpg")]) == 2
    err = capsys.readouterr().err
    assert "prompt is empty" in err and ".png" in err


def test_long_prompt_warns_about_truncation(tiny_models: Path, tmp_path: Path, caplog) -> None:
    main(
        [
            "generate",
            "a red cube " * 40,
            "--steps",
            "1",
            "--models",
            str(tiny_models),
            "-o",
            str(tmp_path / "l.png"),
            "-q",
        ]
    )
    assert "truncated" in caplog.text


def test_generate_end_to_end_with_committed_weights(tmp_path: Path) -> None:
    """The console script, a fresh process, the shipped models: a PNG that the probe can read."""
    out = tmp_path / "e2e.png"
    env = {k: v for k, v in os.environ.items() if k != "KINEMA_MODELS"}
    kinema = Path(sys.executable).with_name("kinema")
    proc = subprocess.run([str(kinema), "generate", "a large red sphere", "-o", str(out), "-q"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import numpy as np

    img = np.asarray(Image.open(out))
    assert img.shape == (64, 64, 3) and img.std() > 5  # a picture, not a flat field


def test_eval_autoencoder_writes_psnr_and_ssim(tiny_models: Path, tmp_path: Path) -> None:
    assert main(["eval", "autoencoder", "--models", str(tiny_models), "--n", "4", "--out", str(tmp_path / "ae")]) == 0
    doc = json.loads((tmp_path / "ae.json").read_text())
    for name in ("synthetic_test", "real_heldout"):
        assert 0 < doc["results"][name]["psnr"] < 60 and -1 <= doc["results"][name]["ssim"] <= 1
    assert doc["command"].startswith("kinema ") and (tmp_path / "ae.md").exists()
