"""Streaming video read and write with PyAV: decode an untrusted clip one RGB frame at a time within limits, and
encode frames to an H.264 MP4 that appears at its path only once it is whole.

`open_video` checks the header (a container with a decodable video stream, frame size, stated length) before any
frame is decoded, and `VideoReader.frames` checks the length again while it decodes, since a header can lie. Every
PyAV error on the reading side becomes an `InvalidInput` naming the request field, with one of the reason codes
NOT_A_VIDEO, UNSUPPORTED_CODEC, VIDEO_TOO_LARGE or VIDEO_TOO_LONG.

`VideoWriter` encodes into a temporary file next to its target and renames it over the target only on a clean
close, so a reader of the target sees the old file or the whole new one, never part of one. Its x264 thread count
is fixed (1 unless asked) because the bytes depend on it and x264's automatic count follows the machine's cores.
With that, the same frames give the same bytes, run after run and process after process, at the sizes a pipeline
writes (checked with av 18.1 from 128x96 to 512x288, 5 to 60 frames, 1 to 4 threads). Not on tiny frames: at
64x48 and 96x64 x264's MB-tree pass (mbtree, with B-frames) gives different bytes from run to run; those
videos still decode to the same picture within the usual H.264 error.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import secrets
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
from PIL import Image

from kinema.errors import InvalidInput

# What PyAV raises: av.FFmpegError and its subclasses, and plain OSError and ValueError from its Python file I/O
# and frame conversions. InvalidInput is a ValueError too, so no `try` below wraps code that raises one.
_AV_ERRORS = (av.FFmpegError, OSError, ValueError)
# Keys the MP4 muxer writes itself: "encoder" is overwritten with the libavformat version and the brands come from
# the `ftyp` box, so a caller's value would not round-trip or would change the file's declared type.
_MUXER_KEYS = frozenset({"encoder", "major_brand", "minor_version", "compatible_brands"})


@dataclass(frozen=True)
class VideoLimits:
    """The longest and largest video a reader accepts: frames, seconds, and pixels per side."""

    max_frames: int = 512
    max_seconds: float = 60.0
    max_side: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_frames", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        seconds = self.max_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
            raise ValueError(f"max_seconds must be a finite number > 0, got {seconds!r}")

    def as_metadata(self) -> dict[str, str]:
        return {"max_frames": str(self.max_frames), "max_seconds": str(self.max_seconds),
                "max_side": str(self.max_side)}  # fmt: skip


DEFAULT_VIDEO_LIMITS = VideoLimits()


@dataclass(frozen=True)
class VideoInfo:
    """A video stream as its header states it; `frames` and `seconds` are 0 where the container does not say."""

    width: int
    height: int
    fps: float
    frames: int
    seconds: float
    codec: str


def fit_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: the largest centred crop of `frame` with the target's aspect ratio, resized with
    Pillow's Lanczos filter (antialiased when shrinking). A frame already at the target size is returned as is."""
    _check_frame(frame)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    h, w = frame.shape[:2]
    if (w, h) == (width, height):
        return frame
    # Crop first, to whole pixels (the aspect ratio is off by under a source pixel), rather than resample from a
    # fractional box: Lanczos on a box reads pixels outside it, so what was cropped away would bleed in at the edges.
    if w * height > width * h:  # wider than the target: crop the sides
        crop = max(1, round(h * width / height))
        frame = frame[:, (w - crop) // 2 : (w - crop) // 2 + crop]
    else:  # taller: crop top and bottom
        crop = max(1, round(w * height / width))
        frame = frame[(h - crop) // 2 : (h - crop) // 2 + crop]
    image = Image.fromarray(np.ascontiguousarray(frame))
    # reducing_gap: shrink by a whole factor with a box filter first when the factor is large (>= 6); the result
    # differs from pure Lanczos by a fraction of a grey level on average, at a fraction of the time on big frames.
    return np.array(image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0))


def _check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        raise ValueError(f"a frame must be an (H, W, 3) uint8 array, got {type(frame).__name__} {shape} "
                         f"{getattr(frame, 'dtype', '')}")  # fmt: skip
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"a frame must have at least one pixel, got shape {frame.shape}")


def _input(source: str | Path | bytes | BinaryIO) -> str | BinaryIO:
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source)
    source.seek(0)
    return source


def _invalid(field: str, message: str, reason: str, **metadata: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}"[:300], reason=reason, field=field, metadata=metadata)


class VideoReader:
    """A video whose header has been checked against `limits`; `frames()` decodes it. Made by `open_video`.

    `source` is a path, the file's bytes, or a seekable binary file (read from its start). Close the reader (or
    use it as a context manager) to release the decoder.
    """

    def __init__(
        self,
        source: str | Path | bytes | BinaryIO,
        field: str = "video",
        limits: VideoLimits = DEFAULT_VIDEO_LIMITS,
    ):
        self.field = field
        self.limits = limits
        self._source = source
        self._container: av.container.InputContainer | None = None
        self._closed = False
        self._open()

    def _open(self) -> None:
        """Open the container and check its header: sets `info` and the stream to decode."""
        try:
            container = av.open(_input(self._source), mode="r")
        except _AV_ERRORS as e:
            raise _invalid(self.field, f"not a readable video ({type(e).__name__}: {e})", "NOT_A_VIDEO") from None
        try:
            self.info = self._check(container)
        except BaseException:
            container.close()
            raise
        self._container, self._stream = container, container.streams.video[0]
        self._fresh = True  # nothing decoded from this container yet

    def _check(self, container: av.container.InputContainer) -> VideoInfo:
        field, limits, name = self.field, self.limits, container.format.name
        if name == "image2" or name.endswith("_pipe"):  # FFmpeg reads a PNG or JPEG as a one-frame video
            raise _invalid(field, f"the file is a still image ({name}), not a video", "NOT_A_VIDEO")
        if not container.streams.video:
            raise _invalid(field, f"the {name} file has no video stream", "NOT_A_VIDEO")
        stream = container.streams.video[0]
        codec = stream.codec_context
        if codec is None:  # FFmpeg has no decoder for the stream's codec
            raise _invalid(field, f"the {name} file's video codec cannot be decoded here; send H.264, HEVC, VP9 or "
                           "AV1", "UNSUPPORTED_CODEC")  # fmt: skip
        if codec.width < 1 or codec.height < 1:
            raise _invalid(field, f"the video stream states no frame size ({codec.width}x{codec.height})",
                           "NOT_A_VIDEO")  # fmt: skip
        self._check_side(codec.width, codec.height)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = container.duration / av.time_base if container.duration else 0.0
        info = VideoInfo(codec.width, codec.height, float(rate) if rate else 0.0, max(stream.frames, 0),
                         max(seconds, 0.0), codec.name)  # fmt: skip
        if info.frames > limits.max_frames or info.seconds > limits.max_seconds:
            raise _invalid(field, f"the video is {info.frames or 'an unstated number of'} frames, {info.seconds:.2f} "
                           f"s long; this server accepts at most {limits.max_frames} frames and "
                           f"{limits.max_seconds:g} s", "VIDEO_TOO_LONG", **limits.as_metadata())  # fmt: skip
        return info

    def _check_side(self, width: int, height: int) -> None:
        limits = self.limits
        if max(width, height) > limits.max_side:
            raise _invalid(self.field, f"the video frame is {width}x{height} pixels; this server accepts at most "
                           f"{limits.max_side} per side", "VIDEO_TOO_LARGE", **limits.as_metadata())  # fmt: skip

    def frames(self, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """Decode the video from its start, one (H, W, 3) uint8 RGB frame at a time.

        Every frame comes at the header's size, or at `size` (width, height) by `fit_frame`. Raises InvalidInput
        VIDEO_TOO_LONG on the first frame past `limits` (by count, or by time since the first frame) whatever the
        header said, VIDEO_TOO_LARGE on a frame larger than the header said and over the limit, and NOT_A_VIDEO if
        the file is cut short or a frame does not decode (metadata "frame": the index of the first frame missed)
        or no frame decodes. Iterate one generator at a time.
        """
        if size is not None and (
            len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size)
        ):
            raise ValueError(f"size must be (width, height) in whole pixels >= 1, got {size!r}")
        if self._closed:
            raise ValueError("the video reader is closed")
        return self._decode(size)

    def _decode(self, size: tuple[int, int] | None) -> Iterator[np.ndarray]:
        field, limits = self.field, self.limits
        index, start = 0, None
        for frame in self._av_frames():
            if index >= limits.max_frames:
                raise _invalid(field, f"the video has more than {limits.max_frames} frames, the most this server "
                               "accepts", "VIDEO_TOO_LONG", **limits.as_metadata())  # fmt: skip
            info = self.info
            time = frame.time if frame.time is not None else (index / info.fps if info.fps else None)
            start = time if start is None else start
            if time is not None and time - start >= limits.max_seconds:
                raise _invalid(field, f"the video runs past {limits.max_seconds:g} s (frame {index} starts at "
                               f"{time - start:.2f} s), the most this server accepts", "VIDEO_TOO_LONG",
                               **limits.as_metadata())  # fmt: skip
            self._check_side(frame.width, frame.height)
            try:
                # a stream that changes size midway is scaled back to its header's size, so its frames stack
                pixels = frame.to_ndarray(width=info.width, height=info.height, format="rgb24")
            except _AV_ERRORS as e:
                raise _invalid(field, f"frame {index} does not convert to RGB ({type(e).__name__}: {e})",
                               "NOT_A_VIDEO", frame=str(index)) from None  # fmt: skip
            yield pixels if size is None else fit_frame(pixels, *size)
            index += 1
        if index == 0:
            raise _invalid(field, "the video has no frame that decodes", "NOT_A_VIDEO")

    def _av_frames(self) -> Iterator[av.VideoFrame]:
        """The decoded frames in display order; NOT_A_VIDEO naming the first frame not delivered on a damaged file."""
        if not self._fresh:  # a second pass reads the source again from its start
            self._container.close()
            self._open()
        self._fresh = False
        field, index = self.field, 0
        packets = self._container.demux(self._stream)  # ends with an empty packet, which flushes the decoder
        while True:
            try:
                packet = next(packets, None)
                frames = packet.decode() if packet is not None and not packet.is_corrupt else []
            except _AV_ERRORS as e:
                raise _invalid(field, f"frame {index} does not decode ({type(e).__name__}: {e})", "NOT_A_VIDEO",
                               frame=str(index)) from None  # fmt: skip
            if packet is None:
                return
            # The demuxer marks a packet it could not read whole (a file cut short); H.264 would decode what is
            # there without an error, so the video would just end early.
            if packet.is_corrupt:
                raise _invalid(field, f"the file is cut short or damaged: {index} frames decode, then a packet is "
                               "incomplete", "NOT_A_VIDEO", frame=str(index))  # fmt: skip
            for frame in frames:
                yield frame
                index += 1

    def close(self) -> None:
        self._closed = True
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_video(
    source: str | Path | bytes | BinaryIO,
    field: str = "video",
    limits: VideoLimits = DEFAULT_VIDEO_LIMITS,
) -> VideoReader:
    """A `VideoReader` for `source`, its header checked against `limits`; InvalidInput naming `field` otherwise."""
    return VideoReader(source, field, limits)


def read_metadata(source: str | Path | bytes | BinaryIO, field: str = "video") -> dict[str, str]:
    """The container's metadata tags, less the ones the MP4 muxer writes itself (see `VideoWriter`)."""
    try:
        with av.open(_input(source), mode="r") as container:
            tags = dict(container.metadata)
    except _AV_ERRORS as e:
        raise _invalid(field, f"not a readable video ({type(e).__name__}: {e})", "NOT_A_VIDEO") from None
    return {k: v for k, v in tags.items() if k.lower() not in _MUXER_KEYS}


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


class VideoWriter:
    """Encode frames to an H.264 (libx264, yuv420p) MP4 at `path`, which appears only when the writer closes cleanly.

    Frames go to a hidden temporary file in `path`'s folder; `close()` (a clean exit from `with`) finishes it and
    renames it over `path`; `abort()` (an exception inside `with`) deletes it and leaves `path` as it was.
    `metadata` becomes the container's tags: any key and value round-trip through `read_metadata` (the muxer
    option `use_metadata_tags` keeps keys MP4 has no atom for), except that keys compare case-insensitively and
    the muxer's own keys ("encoder", "major_brand", "minor_version", "compatible_brands") are refused.
    `crf` is x264's constant rate factor (0 lossless to 51; 18 is visually lossless). `threads` is x264's thread
    count: the bytes depend on it (see the module docstring), so it is fixed rather than automatic; raise it for
    speed on long videos and the bytes are still repeatable for that count. The file is written with `faststart`
    (its index before the frames), so it streams, and a reader can tell a copy cut short by the index.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float | Fraction,
        width: int,
        height: int,
        metadata: Mapping[str, str] | None = None,
        crf: int = 18,
        *,
        threads: int = 1,
    ):
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
                raise ValueError(f"{name} must be an even int >= 2 (H.264 in yuv420p), got {value!r}")
        if isinstance(fps, bool) or not isinstance(fps, int | float | Fraction) or not 0 < fps < math.inf:
            raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
        if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
            raise ValueError(f"crf must be an int in [0, 51], got {crf!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        tags = _check_metadata(metadata or {})
        self.path = Path(path)
        self.width, self.height = width, height
        # 29.97 comes back from a reader as a float; the NTSC rates have denominator 1001
        self.rate = Fraction(fps).limit_denominator(1001)
        self._frames = 0
        self._container: av.container.OutputContainer | None = None
        self._temp = self.path.parent / f".{self.path.name}.{secrets.token_hex(4)}.tmp"
        with open(self._temp, "xb"):  # created here, so it gets the umask's permissions like any new file
            pass
        self._cleanup = weakref.finalize(self, _remove, self._temp)  # a writer dropped unclosed leaves nothing
        try:
            self._container = av.open(str(self._temp), mode="w", format="mp4",
                                      options={"movflags": "use_metadata_tags+faststart"})  # fmt: skip
            self._container.metadata.update(tags)
            self._stream = self._container.add_stream("libx264", rate=self.rate, options={"crf": str(crf)})
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
            self._stream.codec_context.thread_count = threads
        except BaseException:
            self.abort()
            raise

    @property
    def frames_written(self) -> int:
        return self._frames

    def write(self, frame: np.ndarray) -> None:
        """Encode one (height, width, 3) uint8 RGB frame."""
        if self._container is None:
            raise ValueError(f"the video writer for {self.path} is closed")
        _check_frame(frame)
        if frame.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame {self._frames} is {frame.shape[1]}x{frame.shape[0]}; this video is "
                             f"{self.width}x{self.height}")  # fmt: skip
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        picture.pts, picture.time_base = self._frames, 1 / self.rate
        self._container.mux(self._stream.encode(picture))
        self._frames += 1

    def close(self) -> None:
        """Finish the file and rename it to `path`; ValueError (and nothing written) if no frame was written."""
        if self._container is None:
            return
        if self._frames == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}; an MP4 needs at least one")
        try:
            self._container.mux(self._stream.encode(None))
            self._container.close()
            self._container = None
            with open(self._temp, "rb+") as file:  # on disk before the rename makes it visible
                os.fsync(file.fileno())
            os.replace(self._temp, self.path)
        except BaseException:
            self.abort()
            raise
        self._cleanup.detach()

    def abort(self) -> None:
        """Discard what was written: the temporary file is deleted and `path` is left as it was."""
        container, self._container = self._container, None
        if container is not None:
            with contextlib.suppress(*_AV_ERRORS):  # the file is deleted next; an error finishing it does not matter
                container.close()
        _remove(self._temp)
        self._cleanup.detach()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or "\0" in key + value:
            raise ValueError(f"metadata must map non-empty strings to strings without NUL, got {key!r}: {value!r}")
        if key.lower() in _MUXER_KEYS:
            raise ValueError(f"metadata key {key!r} is written by the MP4 muxer itself; use another name")
        if key.lower() in seen:
            raise ValueError(f"metadata keys {seen[key.lower()]!r} and {key!r} are the same key to FFmpeg")
        seen[key.lower()] = key
    return dict(metadata)


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float | Fraction,
    metadata: Mapping[str, str] | None = None,
    crf: int = 18,
) -> int:
    """Encode `frames` (the first one sets the size) to an MP4 at `path` with `VideoWriter`; the number written."""
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"no frames to write to {path}")
    _check_frame(first)
    with VideoWriter(path, fps, first.shape[1], first.shape[0], metadata, crf) as writer:
        writer.write(first)
        for frame in iterator:
            writer.write(frame)
    return writer.frames_written


__all__ = [
    "DEFAULT_VIDEO_LIMITS",
    "VideoInfo",
    "VideoLimits",
    "VideoReader",
    "VideoWriter",
    "fit_frame",
    "open_video",
    "read_metadata",
    "write_video",
]
