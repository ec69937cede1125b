"""edit_video in process with the shipped models: windows cover the clip and share frames, a frame's noise is the
same in every window, output streams out window by window and reproduces bit for bit, strength keeps the input, the
MP4 carries its provenance and is written whole or not at all; bad requests and bad videos name their field."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from kinema.data import World
from kinema.errors import InvalidInput
from kinema.nn.text import TextEmbedding
from kinema.pipelines.edit_video import (
    EditVideoRequest,
    edit_video,
    edit_video_file,
    frame_noise,
    overlap_weights,
    plan_windows,
)
from kinema.pipelines.local import load_local_video
from kinema.pipelines.protocols import VideoSpec
from kinema.storage.video import open_video, read_metadata, write_video

STEPS = 3


@pytest.fixture(scope="module")
def nets():
    return load_local_video()


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """(12, 64, 64, 3) uint8: a synthetic clip with camera and object motion."""
    return np.round(World().clip("test", 3, 12).rgb * 255).astype(np.uint8)


def run(request: EditVideoRequest, frames: np.ndarray, nets, events: list | None = None):
    out: list[np.ndarray] = []

    def sink(frame: np.ndarray) -> None:
        out.append(frame)
        if events is not None:
            events.append(("frame", len(out)))

    def progress(i: int, n: int, _x) -> None:
        if events is not None:
            events.append(("step", i, n))

    result = edit_video(request, lambda: iter(frames), sink, *nets, callback=progress)
    return result, np.stack(out)


@pytest.mark.parametrize(
    ("frames", "window", "overlap", "expected"),
    [
        (5, 8, 2, [(0, 5)]),
        (8, 8, 2, [(0, 8)]),
        (20, 8, 2, [(0, 8), (6, 14), (12, 20)]),
        (17, 8, 2, [(0, 8), (6, 14), (9, 17)]),
        (10, 4, 0, [(0, 4), (4, 8), (6, 10)]),
    ],
)
def test_windows_cover_the_clip_and_share_at_least_the_overlap(frames, window, overlap, expected):
    windows = plan_windows(frames, window, overlap)
    assert windows == expected
    covered = set().union(*(range(s, e) for s, e in windows))
    assert covered == set(range(frames))
    for (s0, e0), (s1, _) in itertools.pairwise(windows):
        assert e0 - s1 >= overlap and s1 > s0


def test_overlap_weights_ramp_from_the_old_window_to_the_new():
    w = overlap_weights(6, 2)
    assert torch.allclose(w, torch.tensor([1 / 3, 2 / 3, 1, 1, 1, 1]))
    assert torch.equal(overlap_weights(4, 0), torch.ones(4))


def test_a_frame_has_the_same_noise_in_every_window():
    assert torch.equal(frame_noise(7, 5, (4, 8, 8)), frame_noise(7, 5, (4, 8, 8)))
    assert not torch.equal(frame_noise(7, 5, (4, 8, 8)), frame_noise(7, 6, (4, 8, 8)))
    assert not torch.equal(frame_noise(7, 5, (4, 8, 8)), frame_noise(8, 5, (4, 8, 8)))


def test_known_frames_with_weight_zero_are_kept_exactly(nets):
    _, _, denoiser, _ = nets
    torch.manual_seed(0)
    noise, known = torch.randn(2, 1, 4, 4, 16, 16)
    text = TextEmbedding(torch.randn(1, 3, 384), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 384), [False])
    spec = VideoSpec(steps=STEPS, guidance=2.0, temporal_guidance=1.0, structure_level=0.0)
    structure = torch.zeros(1, 4, 1, 16, 16)
    weight = torch.tensor([0.0, 0.0, 1.0, 1.0])
    z = denoiser.sample_clip(noise, text, text, structure, spec, None, known=known, known_weight=weight)
    assert torch.equal(z[:, :2], known[:, :2])
    assert not torch.allclose(z[:, 2:], known[:, 2:])


def test_output_streams_window_by_window_and_reproduces(nets, clip):
    request = EditVideoRequest(prompt="a red sphere", steps=STEPS, window=6, overlap=2, seed=3)
    events: list = []
    result, frames = run(request, clip, nets, events)
    assert result.windows == [(0, 6), (4, 10), (6, 12)]
    assert frames.shape == (12, 64, 64, 3) and frames.dtype == np.uint8 and result.frames == 12
    steps = [e for e in events if e[0] == "step"]
    assert [e[1] for e in steps] == list(range(3 * STEPS)) and {e[2] for e in steps} == {3 * STEPS}
    # the first window's four final frames are out before the second window samples
    first_step_of_second = events.index(("step", STEPS, 3 * STEPS))
    assert events[:first_step_of_second].count(("frame", 4)) == 1
    _, again = run(request, clip, nets)
    assert np.array_equal(frames, again)
    _, other_seed = run(EditVideoRequest(prompt="a red sphere", steps=STEPS, window=6, overlap=2, seed=4), clip, nets)
    assert not np.array_equal(frames, other_seed)
    assert set(result.models) == {"text_encoder", "depth", "video_denoiser", "autoencoder"}


def test_a_low_strength_keeps_the_input(nets, clip):
    def error(strength: float) -> float:
        request = EditVideoRequest(prompt="a scene", steps=8, strength=strength, window=6, overlap=2)
        _, frames = run(request, clip[:6], nets)
        return float(np.abs(frames.astype(np.float32) - clip[:6]).mean())

    assert error(0.25) < 0.5 * error(1.0)


def test_content_from_an_image_runs_and_differs_from_text(nets, clip):
    by_image = EditVideoRequest(content_image=clip[0], steps=STEPS, window=6, overlap=2)
    by_text = EditVideoRequest(prompt="a green cube", steps=STEPS, window=6, overlap=2)
    _, a = run(by_image, clip[:6], nets)
    _, b = run(by_text, clip[:6], nets)
    assert a.shape == b.shape == (6, 64, 64, 3) and not np.array_equal(a, b)


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({}, "prompt", "MISSING"),
        ({"prompt": "x", "content_image": np.zeros((8, 8, 3), np.uint8)}, "prompt", "CONFLICT"),
        ({"prompt": "x", "content_image": None, "structure": 1.5}, "structure", "OUT_OF_RANGE"),
        ({"prompt": "x", "temporal_guidance": float("nan")}, "temporal_guidance", "OUT_OF_RANGE"),
        ({"prompt": "x", "window": 65}, "window", "OUT_OF_RANGE"),
        ({"prompt": "x", "window": 4, "overlap": 4}, "overlap", "OUT_OF_RANGE"),
        ({"prompt": "x", "width": 60}, "width", "OUT_OF_RANGE"),
        ({"prompt": "x", "strength": 0.0}, "strength", "OUT_OF_RANGE"),
        ({"content_image": np.zeros((8, 8), np.uint8)}, "content_image", "INVALID_SHAPE"),
    ],
)
def test_bad_requests_name_their_field(nets, clip, fields, field, reason):
    sunk = []
    with pytest.raises(InvalidInput) as e:
        edit_video(EditVideoRequest(**fields), lambda: iter(clip[:2]), sunk.append, *nets)
    assert (e.value.field, e.value.reason) == (field, reason)
    assert not sunk


def test_an_empty_video_is_refused(nets):
    with pytest.raises(InvalidInput, match="no frames") as e:
        edit_video(EditVideoRequest(prompt="x"), lambda: iter(()), lambda f: None, *nets)
    assert e.value.reason == "NOT_A_VIDEO"


def test_the_mp4_keeps_the_frame_rate_and_its_provenance(nets, clip, tmp_path):
    src = tmp_path / "in.mp4"
    write_video(src, clip[:7], fps=12)
    out = tmp_path / "out.mp4"
    request = EditVideoRequest(prompt="a blue cube", steps=STEPS, window=4, overlap=1)
    result = edit_video_file(request, src, out, *nets, metadata={"title": "test"})
    with open_video(out) as reader:
        assert (reader.info.width, reader.info.height, round(reader.info.fps)) == (64, 64, 12)
        assert sum(1 for _ in reader.frames()) == result.frames == 7
    tags = read_metadata(out)
    prov = json.loads(tags["provenance"])
    assert tags["title"] == "test"
    assert prov["settings"]["prompt"] == "a blue cube" and prov["models"] == result.models
    assert len(prov["input_sha256"]) == 64


def test_a_failure_mid_way_leaves_no_file(nets, clip, tmp_path):
    src = tmp_path / "in.mp4"
    write_video(src, clip[:8], fps=8)
    out = tmp_path / "out.mp4"

    def cancel(i: int, n: int, _x) -> None:
        if i == STEPS + 1:  # in the second window, after the first window's frames were written
            raise RuntimeError("cancelled")

    request = EditVideoRequest(prompt="a blue cube", steps=STEPS, window=4, overlap=1)
    with pytest.raises(RuntimeError, match="cancelled"):
        edit_video_file(request, src, out, *nets, callback=cancel)
    assert list(tmp_path.iterdir()) == [src]


def test_a_corrupt_video_is_refused_before_anything_is_written(nets, tmp_path):
    src = tmp_path / "in.mp4"
    src.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    out = tmp_path / "out.mp4"
    with pytest.raises(InvalidInput) as e:
        edit_video_file(EditVideoRequest(prompt="x", steps=STEPS), src, out, *nets)
    assert e.value.reason == "NOT_A_VIDEO" and not out.exists()


def test_a_video_that_shrinks_between_the_two_reads_is_refused(nets, clip):
    reads = []

    def source():  # the second read (SDEdit's init latents) ends early, as a file changed mid-run would
        reads.append(1)
        return iter(clip[:8] if len(reads) == 1 else clip[:5])

    request = EditVideoRequest(prompt="x", steps=4, strength=0.5, window=4, overlap=2)
    with pytest.raises(InvalidInput, match="second read") as e:
        edit_video(request, source, lambda f: None, *nets)
    assert e.value.reason == "NOT_A_VIDEO"
