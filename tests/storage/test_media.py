"""What input bytes are (kinema.storage.media): real PNG, JPEG and MP4 files made here, truncated and mislabelled
ones, and a decompression bomb, all rejected with InvalidInput naming the field before any pixel is decoded."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kinema.errors import InvalidInput
from kinema.storage.media import MediaLimits, decode_image, image_size, media_type_of, probe

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, with one row of pixel data: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))


def mp4(frames: int = 3, side: int = 32) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_png_round_trips_and_jpeg_decodes() -> None:
    data = encoded(PIXELS, "PNG")
    info = probe(data, "image/png", "f")
    assert (info.width, info.height) == (40, 24) and image_size(io.BytesIO(data), "image/png", "f") == (40, 24)
    np.testing.assert_array_equal(decode_image(data, "image/png", "f"), PIXELS)
    jpeg = decode_image(encoded(PIXELS, "JPEG"), "image/jpeg", "f")
    assert jpeg.shape == (24, 40, 3) and jpeg.dtype == np.uint8


def test_modes_alpha_and_masks() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # transparent red: alpha is dropped, the colour stays
    assert decode_image(encoded(rgba, "PNG"), "image/png", "f")[0, 0].tolist() == [200, 0, 0]
    grey = decode_image(encoded(PIXELS, "PNG"), "image/png", "f", mode="L")
    assert grey.shape == (24, 40) and grey.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "media_type", "reason"),
    [
        (b"not an image at all", "image/png", "NOT_AN_IMAGE"),
        (encoded(PIXELS, "PNG")[:120], "image/png", "NOT_AN_IMAGE"),  # truncated: fails at the full decode
        (encoded(PIXELS, "JPEG"), "image/png", "MEDIA_TYPE_MISMATCH"),
        (encoded(PIXELS, "PNG"), "image/gif", "UNSUPPORTED_MEDIA_TYPE"),
        (png_header_only(100_000, 100_000), "image/png", "IMAGE_TOO_LARGE"),  # 10 Gpx in 200 bytes
        (png_header_only(5000, 8), "image/png", "IMAGE_TOO_LARGE"),  # over the per-side limit
    ],
)
def test_what_is_not_a_whole_image_within_limits_is_rejected(data, media_type, reason) -> None:
    with pytest.raises(InvalidInput) as info:
        probe(data, media_type, "inputs.image")
    assert (info.value.reason, info.value.field) == (reason, "inputs.image")
    assert str(info.value).startswith("inputs.image")


def test_limits_are_checked_from_the_header() -> None:
    with pytest.raises(InvalidInput) as info:
        probe(encoded(PIXELS, "PNG"), "image/png", "f", MediaLimits(max_side=32))
    assert info.value.reason == "IMAGE_TOO_LARGE" and info.value.metadata["max_side"] == "32"


def test_videos_are_probed_with_pyav() -> None:
    video = mp4()
    info = probe(video, "video/mp4", "f")
    assert (info.width, info.height, info.frames) == (32, 32, 3)
    for data, media_type, reason in [
        (video[:100], "video/mp4", "NOT_A_VIDEO"),
        (encoded(PIXELS, "PNG"), "video/mp4", "MEDIA_TYPE_MISMATCH"),
        (video, "video/webm", "MEDIA_TYPE_MISMATCH"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            probe(data, media_type, "f")
        assert caught.value.reason == reason
    with pytest.raises(InvalidInput) as caught:
        probe(mp4(side=64), "video/mp4", "f", MediaLimits(max_side=48))
    assert caught.value.reason == "VIDEO_TOO_LARGE"


@pytest.mark.parametrize(("limits", "reason"), [(MediaLimits(max_frames=2), "VIDEO_TOO_LONG"),
                                                (MediaLimits(max_seconds=0.01), "VIDEO_TOO_LONG"),
                                                (MediaLimits(max_side=16), "VIDEO_TOO_LARGE")])  # fmt: skip
def test_video_limits_are_checked_from_the_header(limits, reason) -> None:
    with pytest.raises(InvalidInput) as caught:
        probe(mp4(), "video/mp4", "inputs.video", limits)
    assert (caught.value.reason, caught.value.field) == (reason, "inputs.video")
    assert caught.value.metadata["max_frames"] == str(limits.max_frames)


def test_media_limits_check_their_values() -> None:
    assert MediaLimits(max_side=8, max_frames=3, max_seconds=2).video.max_frames == 3
    for bad in ({"max_frames": 0}, {"max_seconds": float("inf")}, {"max_frames": True}):
        with pytest.raises(ValueError):
            MediaLimits(**bad)


def test_media_type_of() -> None:
    assert media_type_of("a.PNG") == "image/png" and media_type_of("b.jpeg") == "image/jpeg"
    assert media_type_of("noext", b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert media_type_of(None, b"\xff\xd8\xff\xe0") == "image/jpeg"
    with pytest.raises(InvalidInput, match="cannot tell"):
        media_type_of("notes.txt", b"hello")
