"""Edit a video from a prompt or a reference image while keeping its structure (Gen-1, Esser et al. 2023).

    frames ──fit──> depth ──> structure (1, N, 1, h, w), normalised once over the whole clip
    content: the prompt's text embedding, or a reference image's latent (keyframe propagation)
    noise per frame ──> video denoiser (windows of `window` frames, `overlap` shared, all each step) ──> decode

The input is read as a stream of frames (`FrameSource`), twice at most: the first pass estimates depth and keeps
only the structure at the latent size (h x w floats a frame); the second, run only for strength < 1, encodes the
input frames as SDEdit's starting latents. Sampling holds the latents of the whole clip (C x h x w floats a frame,
4 KiB at 64 px) and the network sees one window at a time, so memory grows only by those small per-frame maps.

Long videos have no seam between windows (`kinema.sampling.windows`): every step evaluates every window on the
current latents of the whole clip and blends the windows' velocities where they overlap, with weights that fall
towards each window's edges. The windows move together from noise to the clean clip, so they agree where they meet;
a frame's noise also depends only on (seed, frame index), so a clip reproduces whatever its window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kinema.errors import InvalidInput
from kinema.nn.text import TextEmbedding
from kinema.pipelines.image_to_image import check_image, check_strength
from kinema.pipelines.protocols import Autoencoder, DepthEstimator, TextEncoder, VideoDenoiser, VideoSpec
from kinema.pipelines.text_to_image import check_side, encode_with_negative
from kinema.sampling.edit import start_step
from kinema.sampling.samplers import Callback, initial_noise
from kinema.sampling.windows import window_plans

# A fresh iterator over the input's frames, (H, W, 3) uint8 each, every time it is called.
FrameSource = Callable[[], Iterable[np.ndarray]]
NOISE_STRIDE = 1_000_003  # frame i of seed s draws from generator s * NOISE_STRIDE + i: no two (s, i) pairs share one


@dataclass(frozen=True)
class EditVideoRequest:
    """One edit of a whole clip. Content comes from `prompt` or from `content_image` ((H, W, 3) uint8), not both.

    structure: t_s in [0, 1], the structure-fidelity dial (0 keeps the input's depth closely, 1 only its rough
    layout); temporal_guidance: omega_t (0 samples every frame on its own, 1 as a video, more is steadier);
    guidance: classifier-free guidance omega over the content; strength: 1 samples from noise, less starts from the
    input frames noised part-way (SDEdit) and keeps more of their appearance. width x height: the output's size; the
    input is centre-cropped to its aspect and resized. window / overlap: frames the network sees at once and frames
    two neighbouring windows share (the default, half the window: `default_overlap`).
    """

    prompt: str = ""
    content_image: np.ndarray | None = None
    negative_prompt: str = ""
    structure: float = 0.0
    temporal_guidance: float = 1.0
    guidance: float = 4.0
    steps: int = 28
    strength: float = 1.0
    shift: float = 1.0
    seed: int = 0
    width: int = 64
    height: int = 64
    window: int = 8
    overlap: int = 4

    def validate(self, patch: int, max_window: int) -> None:
        has_image = self.content_image is not None
        if has_image == bool(self.prompt.strip()):
            raise InvalidInput("give the content as a prompt or as a content image, exactly one of them",
                               reason="MISSING" if not has_image else "CONFLICT", field="prompt")  # fmt: skip
        if has_image:
            check_image(self.content_image, 1, field="content_image")
        for name, value, lo, hi in (("structure", self.structure, 0.0, 1.0),
                                    ("temporal_guidance", self.temporal_guidance, 0.0, 10.0),
                                    ("guidance", self.guidance, 0.0, 30.0)):  # fmt: skip
            if not (math.isfinite(value) and lo <= value <= hi):
                raise InvalidInput(f"{name} must be in [{lo:g}, {hi:g}], got {value}", reason="OUT_OF_RANGE",
                                   field=name)  # fmt: skip
        if not 1 <= self.steps <= 1000:
            raise InvalidInput(f"steps must be in 1..1000, got {self.steps}", reason="OUT_OF_RANGE", field="steps")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise InvalidInput(f"shift must be > 0, got {self.shift}", reason="OUT_OF_RANGE", field="shift")
        check_strength(self.strength)
        if not 0 <= self.seed < 2**63 // NOISE_STRIDE:
            raise InvalidInput(f"seed must be in [0, {2**63 // NOISE_STRIDE}), got {self.seed}", reason="OUT_OF_RANGE",
                               field="seed")  # fmt: skip
        check_side(self.width, patch, "width")
        check_side(self.height, patch, "height")
        check_window(self.window, self.overlap, max_window)


@dataclass(frozen=True)
class EditVideoResult:
    frames: int  # frames written to the sink
    windows: list[list[tuple[int, int]]]  # the window plans ([start, end) frames) the steps cycled through
    truncated: bool  # the prompt was cut at the text encoder's token limit
    models: dict[str, str] = field(default_factory=dict)  # name -> sha256


def check_window(window: int, overlap: int, max_frames: int) -> None:
    """A window of 2..max_frames frames and an overlap of 0..window-1 (`VideoDenoiser.sample_clip`)."""
    if not 2 <= window <= max_frames:
        raise InvalidInput(f"window must be in 2..{max_frames} frames, got {window}", reason="OUT_OF_RANGE",
                           field="window")  # fmt: skip
    if not 0 <= overlap < window:
        raise InvalidInput(f"overlap must be in 0..window-1 = {window - 1}, got {overlap}", reason="OUT_OF_RANGE",
                           field="overlap")  # fmt: skip


def resolve_window(frames: int, window: int, overlap: int, max_frames: int) -> int:
    """The window a clip of `frames` frames is sampled in (`VideoDenoiser.sample_clip`): `window` once checked, or
    for window 0 the whole clip, which must then fit the model."""
    if window:
        check_window(window, overlap, max_frames)
        return window
    if frames > max_frames:
        raise InvalidInput(f"the clip has {frames} frames, the model takes at most {max_frames} at once: sample it in "
                           f"windows of 2..{max_frames} frames (window, overlap)", reason="OUT_OF_RANGE",
                           field="window")  # fmt: skip
    return frames


def default_overlap(window: int) -> int:
    """The overlap a request that leaves it unset gets: half the window (bench/video.py, seams)."""
    return window // 2


def frame_noise(seed: int, index: int, shape: tuple[int, ...]) -> Tensor:
    """The starting noise of frame `index` for `seed`: the same whatever the clip's length or windows."""
    return initial_noise(shape, seed * NOISE_STRIDE + index)


def to_pixels(frames: list[np.ndarray]) -> Tensor:
    """(H, W, 3) uint8 frames -> (B, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_frames(pixels: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _batches(frames: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def estimate_structure(
    frames: Iterable[np.ndarray], depth: DepthEstimator, latent_size: tuple[int, int], batch: int
) -> Tensor:
    """Structure (1, N, 1, h, w) in [-1, 1] of fitted frames: disparity area-resampled to the latent size, normalised
    by the clip's minimum and maximum (as `kinema.nn.video.structure_input`, which training used, computes it; area
    resampling is linear, so the order does not matter). Only the latent-size maps are kept."""
    small, lo, hi = [], math.inf, -math.inf
    for chunk in _batches(frames, batch):
        disp = depth.estimate(to_pixels(chunk))  # (B, 1, H, W)
        lo, hi = min(lo, float(disp.min())), max(hi, float(disp.max()))
        small.append(F.interpolate(disp, size=latent_size, mode="area"))  # (B, 1, h, w)
    if not small:
        raise InvalidInput("the video has no frames", reason="NOT_A_VIDEO", field="video")
    disp = torch.cat(small)  # (N, 1, h, w)
    return ((disp - lo) / max(hi - lo, 1e-8) * 2 - 1)[None]  # (1, N, 1, h, w)


def encode_frames(frames: Iterable[np.ndarray], autoencoder: Autoencoder, batch: int) -> Tensor:
    """(1, N, C, h, w) latents of fitted frames, encoded `batch` frames at a time (SDEdit's starting latents)."""
    return torch.cat([autoencoder.encode(to_pixels(chunk)) for chunk in _batches(frames, batch)])[None]


def edit_video(
    request: EditVideoRequest,
    source: FrameSource,
    sink: Callable[[np.ndarray], None],
    text_encoder: TextEncoder,
    depth: DepthEstimator,
    denoiser: VideoDenoiser,
    autoencoder: Autoencoder,
    callback: Callback | None = None,
) -> EditVideoResult:
    """Edit every frame of `source` (frames of any size, fitted to the request's) into `sink`, in order.

    The callback gets (i, n, x) once per sampling step of the whole clip (n = steps run). The same request
    and input reproduce bit for bit on a CPU. InvalidInput for a bad request or an empty video; whatever raises
    mid-way leaves the caller to discard what the sink got (`edit_video_file` writes nothing then).
    """
    from kinema.storage.video import fit_frame

    request.validate(patch=autoencoder.downscale * 2, max_window=denoiser.max_frames)
    size = (request.height // autoencoder.downscale, request.width // autoencoder.downscale)

    def fitted() -> Iterator[np.ndarray]:
        return (fit_frame(f, request.width, request.height) for f in source())

    structure = estimate_structure(fitted(), depth, size, request.window)  # (1, N, 1, h, w)
    n = structure.shape[1]
    truncated = False
    content: TextEmbedding | Tensor
    if request.content_image is not None:
        uncond = text_encoder.encode([request.negative_prompt])
        reference = fit_frame(request.content_image, request.width, request.height)
        content = autoencoder.encode(to_pixels([reference]))  # (1, C, h, w)
    else:
        content, uncond = encode_with_negative(text_encoder, [request.prompt], request.negative_prompt)
        truncated = bool(content.truncated[0])

    first = start_step(request.steps, request.strength)
    spec = VideoSpec(steps=request.steps, guidance=request.guidance, temporal_guidance=request.temporal_guidance,
                     structure_level=request.structure, shift=request.shift, start_step=first)  # fmt: skip
    init = None
    if first:
        init = encode_frames(fitted(), autoencoder, request.window)
        if init.shape[1] != n:  # the first pass counted other frames: the file changed under the run
            raise InvalidInput(f"the video has {init.shape[1]} frames on the second read and {n} on the first; was "
                               "it changed during the edit?", reason="NOT_A_VIDEO", field="video")  # fmt: skip
    latent_shape = (denoiser.latent_channels, *size)
    noise = torch.stack([frame_noise(request.seed, i, latent_shape) for i in range(n)])[None]  # (1, N, C, h, w)
    z = denoiser.sample_clip(noise, content, uncond, structure, spec, callback, init_latents=init,
                             window=request.window, overlap=request.overlap)  # fmt: skip
    written = 0
    for s in range(0, n, request.window):
        for frame in to_frames(autoencoder.decode(z[0, s : s + request.window])):
            sink(frame)
            written += 1
    models = model_fingerprints(text_encoder, depth, denoiser, autoencoder)
    windows = window_plans(n, request.window, request.overlap)
    return EditVideoResult(frames=written, windows=windows, truncated=truncated, models=models)


def model_fingerprints(text_encoder: TextEncoder, depth: DepthEstimator, denoiser: VideoDenoiser,
                       autoencoder: Autoencoder) -> dict[str, str]:  # fmt: skip
    return {"text_encoder": text_encoder.fingerprint(), "depth": depth.fingerprint(),
            "video_denoiser": denoiser.fingerprint(), "autoencoder": autoencoder.fingerprint()}  # fmt: skip


def edit_video_file(
    request: EditVideoRequest,
    source: str | Path | bytes,
    output: str | Path,
    text_encoder: TextEncoder,
    depth: DepthEstimator,
    denoiser: VideoDenoiser,
    autoencoder: Autoencoder,
    callback: Callback | None = None,
    *,
    limits=None,
    metadata: dict[str, str] | None = None,
    crf: int = 18,
    first_frames: int | None = None,
) -> EditVideoResult:
    """`edit_video` from a video file (path or bytes; PyAV) to an H.264 MP4 at `output` at the input's frame rate.

    The MP4 is written to a temporary file and renamed into place only when every frame is in, so an error (a bad
    request, a corrupt frame mid-way, a cancel raised from the callback) leaves nothing at `output`. `metadata` goes
    into the MP4's metadata beside the provenance (`provenance`); `first_frames` edits only that many frames.
    """
    import itertools
    import json

    from kinema.storage.video import VideoLimits, VideoWriter, open_video

    limits = limits or VideoLimits()

    def read(src: str | Path | bytes | BinaryIO) -> Iterator[np.ndarray]:
        with open_video(src, "video", limits) as reader:
            yield from itertools.islice(reader.frames(), first_frames)

    with open_video(source, "video", limits) as reader:
        fps = reader.info.fps
    request.validate(patch=autoencoder.downscale * 2, max_window=denoiser.max_frames)
    models = model_fingerprints(text_encoder, depth, denoiser, autoencoder)
    tags = {**(metadata or {}), "provenance": json.dumps(provenance(request, models, fps, source), sort_keys=True)}
    with VideoWriter(output, fps, request.width, request.height, metadata=tags, crf=crf) as writer:
        return edit_video(request, lambda: read(source), writer.write, text_encoder, depth, denoiser, autoencoder,
                          callback)  # fmt: skip


def provenance(request: EditVideoRequest, models: dict[str, str], fps: float, source: str | Path | bytes) -> dict:
    """What makes an edited video: the input's and the content image's hashes, the request's settings, the models'
    hashes. Known before the first frame is sampled, so it goes into the MP4's header."""
    import dataclasses
    import hashlib

    settings = {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name != "content_image"}
    if request.content_image is not None:
        settings["content_image_sha256"] = hashlib.sha256(np.ascontiguousarray(request.content_image)).hexdigest()
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return {"pipeline": "edit_video", "input_sha256": hashlib.sha256(data).hexdigest(), "settings": settings,
            "models": models, "fps": fps}  # fmt: skip
