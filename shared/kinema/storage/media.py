"""What an input artifact's bytes are: probe (format and dimensions, read from the header before any pixel is
decoded) and decode images with Pillow, probe videos with PyAV.

Uploads are probed and fully decoded once before they are stored, so a stored input is a real image of a size the
server accepts; pipelines decode them again when they read them (`decode_image`). Dimensions are checked before the
pixels are decoded, which is what stops a decompression bomb (a small file of a huge image): Pillow's own
`MAX_IMAGE_PIXELS` check is a global setting this module leaves alone, and it would only warn below twice that.
Videos are checked from their header (frame size, frames, duration) and their first frame is decoded; a pipeline
that reads one checks every frame as it decodes (`kinema.storage.video`).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from kinema.errors import InvalidInput

if TYPE_CHECKING:
    from kinema.storage.video import VideoLimits

# media type -> Pillow format name
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
# media type -> PyAV (FFmpeg) container names it may report
VIDEO_TYPES = {"video/mp4": ("mp4", "mov"), "video/quicktime": ("mov", "mp4"), "video/webm": ("webm", "matroska")}
DEFAULT_MAX_SIDE = 4096
DEFAULT_MAX_FRAMES, DEFAULT_MAX_SECONDS = 512, 60.0  # as kinema.storage.video.VideoLimits
# Media types by file suffix, and by the first bytes of images, for clients that send files.
SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".mp4": "video/mp4",
            ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm"}  # fmt: skip
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


@dataclass(frozen=True)
class MediaLimits:
    """The largest image or video frame accepted, per side (the pixel limit follows, side x side), and the longest
    video, in frames and in seconds (`kinema.storage.video.VideoLimits`' defaults)."""

    max_side: int = DEFAULT_MAX_SIDE
    max_frames: int = DEFAULT_MAX_FRAMES
    max_seconds: float = DEFAULT_MAX_SECONDS

    def __post_init__(self) -> None:
        if isinstance(self.max_side, bool) or not isinstance(self.max_side, int) or self.max_side < 1:
            raise ValueError(f"max_side must be an int >= 1, got {self.max_side!r}")
        if isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"max_frames must be an int >= 1, got {self.max_frames!r}")
        seconds = self.max_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
            raise ValueError(f"max_seconds must be a finite number > 0, got {seconds!r}")

    @property
    def video(self) -> VideoLimits:
        """These limits as the video reader takes them (`kinema.storage.video.VideoLimits`)."""
        from kinema.storage.video import VideoLimits  # PyAV: imported once a video is read

        return VideoLimits(max_frames=self.max_frames, max_seconds=self.max_seconds, max_side=self.max_side)


DEFAULT_LIMITS = MediaLimits()


@dataclass(frozen=True)
class MediaInfo:
    media_type: str
    width: int
    height: int
    frames: int = 1  # a video's frame count as its container states it (0: not stated)


def media_type_of(name: str | None, head: bytes = b"") -> str:
    """The media type of a file by its name's suffix, else (images) by its first bytes; InvalidInput if neither."""
    suffix = name[name.rfind(".") :].lower() if name and "." in name else ""
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    for signature, media_type in _SIGNATURES:
        if head.startswith(signature):
            return media_type
    raise InvalidInput(f"cannot tell the media type of {name or 'the bytes'}; name it: one of "
                       f"{sorted(set(SUFFIXES.values()))}", reason="UNKNOWN_MEDIA_TYPE")  # fmt: skip


def _source(data: bytes | BinaryIO) -> BinaryIO:
    if isinstance(data, bytes | bytearray | memoryview):
        return io.BytesIO(data)
    data.seek(0)
    return data


def _check_side(width: int, height: int, limits: MediaLimits, what: str, field: str) -> None:
    if width < 1 or height < 1 or max(width, height) > limits.max_side:
        raise InvalidInput(
            f"{field}: the {what} is {width}x{height} pixels; this server accepts at most {limits.max_side} per side",
            reason="IMAGE_TOO_LARGE" if width >= 1 and height >= 1 else "NOT_AN_IMAGE",
            field=field,
            metadata={"max_side": str(limits.max_side)},
        )


def _open_image(data: bytes | BinaryIO, media_type: str, field: str, limits: MediaLimits):
    """The Pillow image, header read and checked, pixels not yet decoded."""
    from PIL import Image, UnidentifiedImageError

    fmt = IMAGE_TYPES.get(media_type)
    if fmt is None:
        raise InvalidInput(f"{field}: {media_type!r} is not an image type this server reads ({sorted(IMAGE_TYPES)})",
                           reason="UNSUPPORTED_MEDIA_TYPE", field=field)  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(_source(data), formats=list(IMAGE_TYPES.values()))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(f"{field}: the image's header declares more pixels than any image this server accepts "
                           f"(at most {limits.max_side} per side)", reason="IMAGE_TOO_LARGE", field=field,
                           metadata={"max_side": str(limits.max_side)}) from None  # fmt: skip
    except UnidentifiedImageError:
        raise InvalidInput(f"{field}: not a PNG or JPEG image", reason="NOT_AN_IMAGE", field=field) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidInput(f"{field}: not a readable PNG or JPEG image ({type(e).__name__}: {e})"[:300],
                           reason="NOT_AN_IMAGE", field=field) from None  # fmt: skip
    if image.format != fmt:
        found = next((t for t, f in IMAGE_TYPES.items() if f == image.format), image.format)
        raise InvalidInput(f"{field}: the bytes are {found}, not the declared {media_type}",
                           reason="MEDIA_TYPE_MISMATCH", field=field)  # fmt: skip
    _check_side(image.width, image.height, limits, "image", field)
    return image


def _loaded(data: bytes | BinaryIO, media_type: str, field: str, limits: MediaLimits):
    """The Pillow image with every pixel decoded: a truncated or corrupt file fails here."""
    from PIL import Image

    image = _open_image(data, media_type, field, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(f"{field}: the {media_type} image does not decode ({type(e).__name__}: {e})"[:300],
                           reason="NOT_AN_IMAGE", field=field) from None  # fmt: skip
    return image


def probe_image(data: bytes | BinaryIO, media_type: str, field: str, limits: MediaLimits = DEFAULT_LIMITS) -> MediaInfo:
    """Check that `data` is a whole image of `media_type` within `limits`: header first, then every pixel decoded."""
    image = _loaded(data, media_type, field, limits)
    return MediaInfo(media_type, image.width, image.height)


def image_size(
    data: bytes | BinaryIO, media_type: str, field: str, limits: MediaLimits = DEFAULT_LIMITS
) -> tuple[int, int]:
    """(width, height) from the header alone: cheap, for checks before a run; the pixels are not decoded."""
    image = _open_image(data, media_type, field, limits)
    return image.width, image.height


def decode_image(
    data: bytes | BinaryIO,
    media_type: str,
    field: str,
    limits: MediaLimits = DEFAULT_LIMITS,
    mode: str = "RGB",
) -> np.ndarray:
    """The pixels, (H, W, 3) uint8 for mode "RGB", (H, W) uint8 for "L"; InvalidInput naming `field` for anything
    that is not a whole image within limits. Transparency is dropped (a transparent pixel keeps its colour), and
    "L" is Pillow's luminance, so a colour mask works."""
    image = _loaded(data, media_type, field, limits)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    return np.asarray(image.convert(mode))


def probe_video(data: bytes | BinaryIO, media_type: str, field: str, limits: MediaLimits = DEFAULT_LIMITS) -> MediaInfo:
    """Check that `data` is a `media_type` container with a video stream within `limits` whose first frame decodes
    (PyAV). Frame size, frame count and duration come from the stream's header, before any frame is decoded
    (`kinema.storage.video.open_video`: VIDEO_TOO_LARGE, VIDEO_TOO_LONG, UNSUPPORTED_CODEC, NOT_A_VIDEO). Only the
    first frame is decoded, so this stays cheap for long videos; a pipeline reading the video checks every frame
    and counts frames and time again as it decodes, which catches a header that lies."""
    import av

    from kinema.storage.video import open_video

    containers = VIDEO_TYPES.get(media_type)
    if containers is None:
        raise InvalidInput(f"{field}: {media_type!r} is not a video type this server reads ({sorted(VIDEO_TYPES)})",
                           reason="UNSUPPORTED_MEDIA_TYPE", field=field)  # fmt: skip
    try:
        with av.open(_source(data), mode="r") as container:
            names = set(container.format.name.split(","))
    except av.FFmpegError as e:
        raise InvalidInput(f"{field}: not a {media_type} video ({type(e).__name__}: {e})"[:300], reason="NOT_A_VIDEO",
                           field=field) from None  # fmt: skip
    if not names & set(containers):
        raise InvalidInput(f"{field}: the bytes are a {','.join(sorted(names))} container, not {media_type}",
                           reason="MEDIA_TYPE_MISMATCH", field=field)  # fmt: skip
    with open_video(_source(data), field, limits.video) as reader:
        next(reader.frames())  # NOT_A_VIDEO when no frame decodes
        return MediaInfo(media_type, reader.info.width, reader.info.height, reader.info.frames)


def probe(data: bytes | BinaryIO, media_type: str, field: str, limits: MediaLimits = DEFAULT_LIMITS) -> MediaInfo:
    """`probe_image` or `probe_video` by the media type's family."""
    if media_type in VIDEO_TYPES:
        return probe_video(data, media_type, field, limits)
    return probe_image(data, media_type, field, limits)


__all__ = [
    "DEFAULT_LIMITS",
    "IMAGE_TYPES",
    "SUFFIXES",
    "VIDEO_TYPES",
    "MediaInfo",
    "MediaLimits",
    "decode_image",
    "image_size",
    "media_type_of",
    "probe",
    "probe_image",
    "probe_video",
]
