"""`KinemaClient.upload` and the CLI's --init-image / --mask through a real server: the remote edit writes the
embedded edit's PNG, and a job's inputs are checked at submit."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kinema.cli import main as kinema_main
from kinema.errors import InvalidInput, NotFound

pytestmark = pytest.mark.slow


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit-inputs")
    assert kinema_main(["generate", "a red cube", "--steps", "4", "--seed", "2", "-q", "-o", str(root / "in.png")]) == 0
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:32]).save(root / "small-mask.png")
    (root / "notes.png").write_bytes(b"not an image")
    return root


def test_upload_round_trips_and_skips_bytes_the_tenant_holds(kinema, files) -> None:
    ref = kinema.upload(files / "in.png")
    assert ref.media_type == "image/png" and kinema.read(ref.sha256) == (files / "in.png").read_bytes()
    got = kinema.get_artifact(ref)
    assert got.provenance.pipeline == "upload" and got.provenance.parameters["filename"] == "in.png"
    assert kinema.upload((files / "in.png").read_bytes()) == ref
    with pytest.raises(InvalidInput) as info:
        kinema.upload(files / "notes.png")
    assert info.value.reason == "NOT_AN_IMAGE"


def test_jobs_check_their_inputs_at_submit(kinema, files) -> None:
    image, small = kinema.upload(files / "in.png"), kinema.upload(files / "small-mask.png")
    with pytest.raises(NotFound) as info:
        kinema.submit_job("a cube", pipeline="image_to_image", inputs={"image": "cd" * 32}, steps=2)
    assert info.value.field == "inputs.image"
    with pytest.raises(InvalidInput) as info:
        kinema.submit_job("a cube", pipeline="inpaint", inputs={"image": image, "mask": small}, steps=2)
    assert info.value.field == "inputs.mask" and info.value.reason == "SIZE_MISMATCH"
    job = kinema.submit_job("a cube", pipeline="image_to_image", inputs={"image": image}, steps=4, seed=1,
                            strength=0.5)  # fmt: skip
    done = kinema.watch_job(job.id)
    want = kinema.generate("a cube", pipeline="image_to_image", inputs={"image": image}, steps=4, seed=1, strength=0.5)
    assert done.outputs[0].artifact.sha256 == want.outputs[0].artifact.sha256  # a job stores what Generate stores
    assert list(done.outputs[0].provenance.parent_sha256) == [image.sha256]


@pytest.mark.parametrize("edit", [["--strength", "0.6"], ["--mask", "mask.png"]])
def test_remote_edits_write_the_embedded_pngs(server, files, tmp_path, edit) -> None:
    edit = [str(files / a) if a.endswith(".png") else a for a in edit]
    argv = ["generate", "a green cone", "--init-image", str(files / "in.png"), *edit, "--steps", "4", "--seed", "5",
            "-q"]  # fmt: skip
    assert kinema_main([*argv, "-o", str(tmp_path / "local.png")]) == 0
    assert kinema_main([*argv, "--server", server.address, "-o", str(tmp_path / "remote.png")]) == 0
    assert np.abs(_pixels(tmp_path / "remote.png") - _pixels(tmp_path / "local.png")).max() <= 1
    info = Image.open(tmp_path / "remote.png").text
    assert "artifact" in info and ("inpaint" if "--mask" in edit else "image_to_image") in info["parameters"]


def test_remote_edit_errors_name_the_option(server, files, tmp_path, capsys) -> None:
    base = ["generate", "a cone", "--server", server.address, "-o", str(tmp_path / "x.png"), "-q"]
    assert kinema_main([*base, "--init-image", str(files / "notes.png")]) == 2
    assert f"--init-image {files / 'notes.png'}" in capsys.readouterr().err
    assert kinema_main([*base, "--init-image", str(files / "in.png"), "--mask", str(files / "small-mask.png")]) == 2
    err = capsys.readouterr().err
    assert "must be the same size" in err and "(--mask)" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
