"""`kinema edit-video` on this machine: an MP4 out with its provenance, keyframe propagation, and one clear line with
exit status 2 (and no file) for a bad request or a bad video."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kinema.cli import main
from kinema.data import World
from kinema.storage.video import open_video, read_metadata, write_video


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("video") / "in.mp4"
    write_video(path, np.round(World().clip("test", 11, 10).rgb * 255).astype(np.uint8), fps=10)
    return str(path)


def test_the_cli_defaults_are_the_pipelines():
    from kinema.pipelines.edit_video import EditVideoRequest, default_overlap
    from kinema.video_cli import DEFAULT_WINDOW

    assert EditVideoRequest.window == DEFAULT_WINDOW
    assert EditVideoRequest.overlap == default_overlap(EditVideoRequest.window) == 4


def test_edit_video_writes_the_clip_with_its_provenance(clip_file, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    rc = main(["edit-video", clip_file, "--prompt", "a green cone", "--steps", "2", "--structure", "0.5",
               "--temporal-guidance", "1.5", "--window", "6", "-o", str(out), "-q"])  # fmt: skip
    assert rc == 0 and out.is_file()
    assert capsys.readouterr().out.strip() == str(out)
    with open_video(out) as reader:
        assert sum(1 for _ in reader.frames()) == 10 and round(reader.info.fps) == 10
    settings = json.loads(read_metadata(out)["provenance"])["settings"]
    assert (settings["structure"], settings["temporal_guidance"], settings["window"]) == (0.5, 1.5, 6)


def test_keyframe_propagation_saves_the_edited_keyframe(clip_file, tmp_path):
    out = tmp_path / "kf.mp4"
    rc = main(["edit-video", clip_file, "--keyframe-prompt", "a red sphere", "--keyframe", "3", "--steps", "2",
               "--frames", "4", "-o", str(out), "-q"])  # fmt: skip
    assert rc == 0 and out.is_file() and out.with_suffix(".keyframe.png").is_file()
    prov = json.loads(read_metadata(out)["provenance"])
    assert prov["settings"]["prompt"] == "" and len(prov["settings"]["content_image_sha256"]) == 64


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "x", "--window", "1"], "--window: window must be in 2..64"),
        (["--prompt", "x", "--size", "60"], "--size: width must be a multiple of 8"),
        (["--prompt", "x", "--content-image", "nope.png"], "--content-image"),
        ([], "give the content one way"),
    ],
)
def test_bad_requests_exit_2_with_one_line_and_no_file(clip_file, tmp_path, capsys, extra, message):
    out = tmp_path / "out.mp4"
    assert main(["edit-video", clip_file, "-o", str(out), "-q", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_corrupt_video_exits_2_and_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 50)
    out = tmp_path / "out.mp4"
    assert main(["edit-video", str(bad), "--prompt", "x", "-o", str(out), "-q"]) == 2
    assert f"{bad}: not a readable video" in capsys.readouterr().err
    assert not out.exists()
