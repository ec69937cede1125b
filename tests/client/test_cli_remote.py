"""`kinema --server ...`: generate and jobs through the orchestrator (tests/client/conftest.py), PNGs equal to the
artifacts with their provenance as text metadata, and one-line errors with exit statuses."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from kinema.cli import main
from kinema.client import KinemaClient

pytestmark = pytest.mark.slow

PROMPT = "a small red sphere to the left of a blue cube"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def assert_png_is_the_artifact(path, kinema) -> None:
    """The file holds the artifact's pixels and, as text, what the artifact's provenance says."""
    img = Image.open(path)
    got = kinema.get_artifact(img.text["artifact"])
    p = got.provenance
    stored = Image.open(io.BytesIO(kinema.read(got)))
    assert np.array_equal(_pixels(img), _pixels(stored))
    params = json_format.MessageToDict(p.parameters)
    assert json.loads(img.text["parameters"]) == params and img.text["prompt"] == params["prompts"][0]
    assert img.text["seed"] == str(p.seed) and img.text["software"] == "kinema"
    assert json.loads(img.text["models"]) == {cap: m.sha256 for cap, m in p.models.items()}


def test_remote_generate_writes_the_artifacts_pngs(server, kinema, tmp_path, capsys) -> None:
    out = tmp_path / "cube.png"
    code, stdout, stderr = run(capsys, "--server", server.address, "generate", PROMPT, "--n", "2", "--seed", "3",
                               "--steps", "3", "-o", str(out))  # fmt: skip
    paths = [tmp_path / "cube-0.png", tmp_path / "cube-1.png"]
    assert code == 0 and stdout.split() == [str(p) for p in paths], stderr
    assert "sampling" in stderr and "3/3" in stderr  # the progress bar, from the stream
    for path, seed in zip(paths, (3, 4), strict=True):
        assert_png_is_the_artifact(path, kinema)
        assert Image.open(path).text["seed"] == str(seed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube-0.png", "cube-1.png"]

    # --server after the command, one image: the plain name; -q: no bar.
    code, stdout, stderr = run(capsys, "generate", "a yellow cone", "--steps", "2", "-q", "-o", str(out),
                               "--server", server.address)  # fmt: skip
    assert code == 0 and stdout.split() == [str(out)] and stderr == ""
    assert Image.open(out).text["prompt"] == "a yellow cone"


def test_jobs_submit_watch_cancel_and_list(server, tmp_path, capsys) -> None:
    base = ("--server", server.address, "--tenant", "cli-jobs")
    code, out, _ = run(capsys, *base, "jobs", "submit", PROMPT, "--steps", "3", "--seed", "4")
    job_id = out.strip()
    assert code == 0 and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", job_id)

    code, out, err = run(capsys, *base, "jobs", "watch", job_id, "-o", str(tmp_path / "job.png"))
    assert code == 0 and out.split() == [str(tmp_path / "job.png")] and "3/3" in err
    assert Image.open(tmp_path / "job.png").text["seed"] == "4"
    with KinemaClient(server.address, tenant="cli-jobs") as tenant_client:
        assert_png_is_the_artifact(tmp_path / "job.png", tenant_client)
    code, out, _ = run(capsys, *base, "jobs", "watch", job_id, "-q")  # a finished job: at once; without -o the sha256
    assert code == 0 and out.split() == [Image.open(tmp_path / "job.png").text["artifact"]]

    code, out, _ = run(capsys, *base, "jobs", "submit", "a purple cube", "--steps", "1000")
    long_id = out.strip()
    code, out, _ = run(capsys, *base, "jobs", "cancel", long_id)
    assert code == 0 and re.fullmatch(rf"{long_id} (cancelled|running \(cancel requested.*\))", out.strip())
    code, out, err = run(capsys, *base, "jobs", "watch", long_id, "-q")
    assert code == 1 and err == f"kinema: error: job {long_id} was cancelled\n"

    # Accepted at submit, failed when run: only the autoencoder knows that 12 px is not a multiple of its pixel
    # patch (the CLI's --size takes multiples of 8 only, so this one is submitted with the client).
    with KinemaClient(server.address, tenant="cli-jobs") as tenant_client:
        bad_id = tenant_client.submit_job("a cube", steps=1, size=12).id
    code, out, err = run(capsys, *base, "jobs", "watch", bad_id, "-q")
    assert code == 1 and err.startswith(f"kinema: error: job {bad_id} failed: ")
    assert "(INVALID_ARGUMENT, --size)" in err and "Traceback" not in err and err.count("\n") == 1

    code, out, _ = run(capsys, *base, "jobs", "list")
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:2] == ["ID", "STATE"]
    assert [r.split()[:2] for r in rows] == [[bad_id, "failed"], [long_id, "cancelled"], [job_id, "completed"]]
    assert rows[-1].split()[4] == "3/3" and rows[-1].endswith(PROMPT)
    code, out, _ = run(capsys, *base, "jobs", "list", "--state", "completed")
    assert [r.split()[0] for r in out.splitlines()[1:]] == [job_id]
    code, out, err = run(capsys, "jobs", "list", "--server", server.address, "--tenant", "cli-nobody")
    assert code == 0 and out == "" and err == "no jobs\n"


def test_errors_are_one_clear_line_and_an_exit_status(server, tmp_path, capsys) -> None:
    at = ("--server", server.address)
    out = str(tmp_path / "x.png")
    cases = [
        ((*at, "jobs", "watch", "nosuchjob"), 2, "no job 'nosuchjob' (the job ID)"),
        ((*at, "jobs", "cancel", "no:such"), 2, "id must be 1-64 of"),
        ((*at, "generate", PROMPT, "--steps", "1001", "-q", "-o", out), 2, "steps must be <= 1000, got 1001 (--steps)"),
        ((*at, "generate", PROMPT, "--n", "17", "--steps", "1", "-q", "-o", out), 2, "split the request (--n)"),
        ((*at, "--tenant", "Not A Tenant", "jobs", "list"), 2, "(--tenant)"),
    ]
    for argv, want, message in cases:
        code, stdout, err = run(capsys, *argv)
        assert code == want and message in err, (argv, err)
        assert err.startswith("kinema: error: ") and err.count("\n") == 1 and stdout == "", err
    assert not list(tmp_path.iterdir())
