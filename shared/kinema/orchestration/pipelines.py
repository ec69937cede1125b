"""The pipelines the orchestrator serves, by name.

Each is a small adapter over a library pipeline (`kinema.pipelines`): `prepare` checks a
`kinema.orchestrator.v1.PipelineRequest` and fills in its defaults without calling any service, `run` runs it
over bound capability clients in a worker thread, and `info` describes it for ListPipelines. A later pipeline
registers itself with `REGISTRY.register(...)`; the service does not change. The image pipelines (text_to_image,
image_to_image, inpaint) make PNGs; edit_video makes one MP4 from an uploaded video (docs/video.md, "As a job").
"""

from __future__ import annotations

import io
import math
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import json_format, struct_pb2
from PIL import Image

from kinema.errors import InvalidInput, NotFound
from kinema.orchestration.capabilities import Bound
from kinema.orchestration.inputs import StoredInputs
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.pipelines.edit_video import NOISE_STRIDE, EditVideoRequest, default_overlap, edit_video_file
from kinema.pipelines.image_to_image import ImageToImageRequest, check_strength, image_to_image
from kinema.pipelines.inpaint import InpaintRequest, inpaint
from kinema.pipelines.text_to_image import (
    MAX_SIZE,
    TextToImageRequest,
    check_sampling,
    sampling_defaults,
    text_to_image,
)
from kinema.sampling.samplers import Callback
from kinema.storage.video import VideoInfo, open_video

SEED_LIMIT = 2**63


@dataclass(frozen=True)
class PipelineOutput:
    """One made output, not yet stored: its bytes and what its provenance records."""

    index: int
    data: bytes
    media_type: str
    seed: int | None
    prompt_truncated: bool
    parameters: dict[str, Any]  # the resolved request of this output alone, keyed by PipelineRequest field names
    models: dict[str, str]  # capability -> weight sha256
    parents: tuple[str, ...] = ()  # sha256 of the input artifacts it was made from


class Pipeline(Protocol):
    """What the orchestrator needs of a pipeline."""

    name: str
    capabilities: tuple[str, ...]  # the keys it accepts in PipelineRequest.models
    seed_limit: int  # seeds it takes are below this; SubmitJob draws an unset one below it

    def info(self) -> pb.PipelineInfo: ...

    def prepare(self, request: pb.PipelineRequest, max_batch: int) -> Any:
        """The library request with every default filled in; InvalidInput naming the field. No service calls."""
        ...

    def run(self, prepared: Any, bound: Bound, callback: Callback | None) -> list[PipelineOutput]:
        """Run `prepared` over the bound clients (blocking); outputs ordered by index."""
        ...


class Registry:
    """Pipelines by name."""

    def __init__(self) -> None:
        self._pipelines: dict[str, Pipeline] = {}

    def register(self, pipeline: Pipeline) -> Pipeline:
        if pipeline.name in self._pipelines:
            raise ValueError(f"pipeline {pipeline.name!r} is already registered")
        self._pipelines[pipeline.name] = pipeline
        return pipeline

    def names(self) -> list[str]:
        return sorted(self._pipelines)

    def get(self, name: str) -> Pipeline:
        if not name:
            raise InvalidInput(f"pipeline is required; one of {self.names()}", reason="MISSING", field="pipeline")
        try:
            return self._pipelines[name]
        except KeyError:
            raise NotFound(
                f"no pipeline {name!r}; registered: {', '.join(self.names())}",
                reason="PIPELINE_NOT_FOUND",
                field="pipeline",
            ) from None

    def infos(self, name: str = "") -> list[pb.PipelineInfo]:
        return [self._pipelines[n].info() for n in self.names() if not name or n == name]


def reject_unread(request: pb.PipelineRequest, pipeline: str, reads: frozenset[str], capabilities: tuple[str, ...]):
    """InvalidInput naming the first set field (or model capability) the pipeline does not read."""
    for fd, _ in request.ListFields():
        if fd.name != "pipeline" and fd.name not in reads:
            raise InvalidInput(f"{fd.name} is not read by pipeline {pipeline!r}; leave it unset",
                               reason="UNUSED_FIELD", field=fd.name)  # fmt: skip
    for cap in sorted(request.models):
        if cap not in capabilities:
            raise InvalidInput(f"pipeline {pipeline!r} runs no {cap!r} model; it runs {list(capabilities)}",
                               reason="UNUSED_CAPABILITY", field=f"models.{cap}")  # fmt: skip


def png(image: Any) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _value(v: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if isinstance(v, str):
        value.string_value = v
    else:
        value.number_value = v
    return value


def _param(name: str, description: str, default: Any = None, required: bool = False) -> pb.ParameterInfo:
    info = pb.ParameterInfo(name=name, description=description, required=required)
    if default is not None:
        info.default_value.CopyFrom(_value(default))
    return info


# The library request's field names where they differ from PipelineRequest's.
_REQUEST_FIELDS = {"size": "width"}


def _with_field(e: InvalidInput) -> InvalidInput:
    """`e` with the PipelineRequest field it is about (a library error says 'size', the request 'width')."""
    field = _REQUEST_FIELDS.get(e.field, e.field)
    if field == e.field:
        return e
    return InvalidInput(f"width and height: {e}", reason=e.reason or "OUT_OF_RANGE", field=field, metadata=e.metadata)


def prompts_and_seed(request: pb.PipelineRequest, max_batch: int) -> int:
    """Check the prompts against the batch limit; the seed of the first output (drawn when unset)."""
    n = len(request.prompts)
    if n == 0:
        raise InvalidInput("at least one prompt is required", reason="MISSING", field="prompts")
    if n > max_batch:
        raise InvalidInput(
            f"{n} prompts are over this server's batch limit of {max_batch}; split the request",
            reason="BATCH_TOO_LARGE",
            field="prompts",
            metadata={"max_batch": str(max_batch)},
        )
    if not request.HasField("seed"):
        return secrets.randbelow(SEED_LIMIT - max_batch)
    if request.seed + n > SEED_LIMIT:
        raise InvalidInput(f"seed + {n - 1} (the last output's seed) must be < 2**63, got seed {request.seed}",
                           reason="OUT_OF_RANGE", field="seed")  # fmt: skip
    return request.seed


@dataclass(frozen=True)
class PreparedTextToImage(TextToImageRequest):
    """A checked text_to_image request; `defaulted` names the sampling fields the client left unset, filled in with
    the teacher's defaults until `run` knows the denoiser (a few-step student has its own: `sampling_defaults`)."""

    defaulted: frozenset[str] = frozenset()


class TextToImagePipeline:
    """`kinema.pipelines.text_to_image` behind the orchestrator; a student denoiser samples with its few-step
    sampler (models.denoiser naming a model of the distill service, `kinema.orchestration.capabilities`)."""

    name = "text_to_image"
    capabilities = ("autoencoder", "denoiser", "text_encoder")
    seed_limit = SEED_LIMIT
    defaults = TextToImageRequest(prompts=[])
    _reads = frozenset({"prompts", "negative_prompt", "seed", "steps", "guidance", "width", "height", "sampler",
                        "shift", "models"})  # fmt: skip

    def info(self) -> pb.PipelineInfo:
        d = self.defaults
        return pb.PipelineInfo(
            name=self.name,
            description=(
                "Images from text with a rectified-flow MMDiT sampled in a KL autoencoder's latent space "
                "(Esser et al. 2024, SD3; Rombach et al. 2022, LDM), classifier-free guided (Ho & Salimans 2022). "
                "One square PNG per prompt; output i uses seed + i."
            ),
            parameters=[
                _param("prompts", "the prompts, one output each; 1 to the server's batch limit", required=True),
                _param("negative_prompt", "the prompt guidance steers away from", d.negative_prompt),
                _param("seed", "seed of the first output, in [0, 2^63); unset: drawn by the server"),
                _param(
                    "steps", "sampling steps, 1..1000; unset with a few-step student denoiser: its own (1..8)", d.steps
                ),
                _param(
                    "guidance",
                    "classifier-free guidance scale >= 0 (1: none); a student takes none (unset or 1)",
                    d.guidance,
                ),
                _param("width", "image side in pixels, a multiple of the model's pixel patch up to 256", d.size),
                _param("height", "must equal width (square images only)", d.size),
                _param("sampler", "ODE sampler: 'euler' or 'heun'", d.sampler),
                _param("shift", "timestep shift s > 0 of the schedule (SD3 eq. 23)", d.shift),
            ],
            capabilities=list(self.capabilities),
            output_media_type="image/png",
        )

    def prepare(self, request: pb.PipelineRequest, max_batch: int) -> PreparedTextToImage:
        reject_unread(request, self.name, self._reads, self.capabilities)
        seed = prompts_and_seed(request, max_batch)
        width, height = request.width or self.defaults.size, request.height or self.defaults.size
        if width != height:
            raise InvalidInput(f"{self.name} makes square images: width {width} != height {height}",
                               reason="NOT_SQUARE", field="width")  # fmt: skip
        defaulted = {"steps"} if not request.steps else set()
        defaulted |= {"guidance"} if not request.HasField("guidance") else set()
        prepared = PreparedTextToImage(
            defaulted=frozenset(defaulted),
            prompts=list(request.prompts),
            negative_prompt=request.negative_prompt,
            seed=seed,
            steps=request.steps or self.defaults.steps,
            guidance=request.guidance if request.HasField("guidance") else self.defaults.guidance,
            size=width,
            sampler=request.sampler or self.defaults.sampler,
            shift=request.shift or self.defaults.shift,
        )
        try:
            prepared.validate(patch=1)  # everything but the model's patch, known once the autoencoder answers
        except InvalidInput as e:
            raise _with_field(e) from None
        return prepared

    def run(self, prepared: PreparedTextToImage, bound: Bound, callback: Callback | None) -> list[PipelineOutput]:
        c = bound.clients
        if prepared.defaulted:  # the bound denoiser's own defaults: a student's steps and no guidance
            steps, guidance = sampling_defaults(c["denoiser"])
            fill = {"steps": steps, "guidance": guidance}
            prepared = replace(prepared, **{name: fill[name] for name in prepared.defaulted})
        try:
            result = text_to_image(prepared, c["text_encoder"], c["denoiser"], c["autoencoder"], callback)
        except InvalidInput as e:
            raise _with_field(e) from None
        common = {"negative_prompt": prepared.negative_prompt, "steps": prepared.steps, "guidance": prepared.guidance,
                  "width": prepared.size, "height": prepared.size, "sampler": prepared.sampler,
                  "shift": prepared.shift}  # fmt: skip
        return image_outputs(self.name, result, prepared.prompts, common, bound)


def image_outputs(
    pipeline: str, result: Any, prompts: list[str], common: dict[str, Any], bound: Bound, parents: tuple[str, ...] = ()
) -> list[PipelineOutput]:
    """One PNG output per prompt of an image pipeline's result (images, seeds, truncated, models), each with the
    resolved request of that output alone: `common` (the request's fields) plus its prompt, seed and models."""
    models = {cap: sha for cap, sha in result.models.items() if sha}
    outputs = []
    for i, (image, prompt, seed, cut) in enumerate(
        zip(result.images, prompts, result.seeds, result.truncated, strict=True)
    ):
        parameters = {
            "pipeline": pipeline,
            "prompts": [prompt],
            "seed": str(seed),  # proto3 JSON writes 64-bit integers as strings: exact through ParseDict
            **common,
            "models": {cap: dict(ref) for cap, ref in bound.models.items()},
        }
        outputs.append(PipelineOutput(i, png(image), "image/png", seed, bool(cut), parameters, models, parents))
    return outputs


IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png")
# A library edit error's field -> the PipelineRequest field it is about.
_EDIT_FIELDS = {"image": "inputs.image", "mask": "inputs.mask", "denoiser": "models.denoiser"}


def _edit_field(e: InvalidInput) -> InvalidInput:
    field = _EDIT_FIELDS.get(e.field)
    if field is None:
        return e
    return InvalidInput(f"{field}: {e}", reason=e.reason or "OUT_OF_RANGE", field=field, metadata=e.metadata)


@dataclass(frozen=True)
class EditPlan:
    """A checked image_to_image or inpaint request, every default filled in; the images are read at run time."""

    prompts: tuple[str, ...]
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str
    shift: float
    strength: float
    width: int  # 0: the input image's
    height: int
    inputs: tuple[tuple[str, str], ...]  # (name, sha256) as requested


class _EditPipeline:
    """What image_to_image and inpaint share: an input image whose size the outputs keep, and a strength."""

    name: str
    description: str
    inputs: tuple[pb.InputInfo, ...]
    default_strength: float
    capabilities = ("autoencoder", "denoiser", "text_encoder")
    seed_limit = SEED_LIMIT
    defaults = TextToImageRequest(prompts=[])
    _reads = frozenset({"prompts", "negative_prompt", "seed", "steps", "guidance", "width", "height", "sampler",
                        "shift", "strength", "inputs", "models"})  # fmt: skip

    def info(self) -> pb.PipelineInfo:
        d = self.defaults
        return pb.PipelineInfo(
            name=self.name,
            description=self.description,
            inputs=list(self.inputs),
            parameters=[
                _param("prompts", "the prompts, one output each; 1 to the server's batch limit", required=True),
                _param("negative_prompt", "the prompt guidance steers away from", d.negative_prompt),
                _param("seed", "seed of the first output, in [0, 2^63); unset: drawn by the server"),
                _param(
                    "steps",
                    "sampling steps of the full schedule, 1..1000; the run takes the last ceil(strength * steps)",
                    d.steps,
                ),
                _param("guidance", "classifier-free guidance scale >= 0 (1: none)", d.guidance),
                _param(
                    "strength",
                    "how far from the input to move, in (0, 1]; 1 starts from pure noise",
                    self.default_strength,
                ),
                _param(
                    "width",
                    "0 or the input image's width (never resized); a multiple of the model's pixel patch up to 256",
                ),
                _param("height", "0 or the input image's height"),
                _param("sampler", "ODE sampler: 'euler' or 'heun'", d.sampler),
                _param("shift", "timestep shift s > 0 of the schedule (SD3 eq. 23)", d.shift),
            ],
            capabilities=list(self.capabilities),
            output_media_type="image/png",
        )

    def prepare(self, request: pb.PipelineRequest, max_batch: int) -> EditPlan:
        reject_unread(request, self.name, self._reads, self.capabilities)
        seed = prompts_and_seed(request, max_batch)
        names = {i.name for i in self.inputs}
        for name in sorted(request.inputs):
            if name not in names:
                raise InvalidInput(f"pipeline {self.name!r} reads no input {name!r}; it reads {sorted(names)}",
                                   reason="UNUSED_INPUT", field=f"inputs.{name}")  # fmt: skip
        for i in self.inputs:
            if i.required and i.name not in request.inputs:
                raise InvalidInput(f"{self.name} needs inputs.{i.name}: {i.description}", reason="MISSING",
                                   field=f"inputs.{i.name}")  # fmt: skip
        for side in ("width", "height"):
            if getattr(request, side) < 0:
                raise InvalidInput(f"{side} must be 0 or the input image's {side}, got {getattr(request, side)}",
                                   reason="OUT_OF_RANGE", field=side)  # fmt: skip
        d = self.defaults
        plan = EditPlan(
            prompts=tuple(request.prompts),
            negative_prompt=request.negative_prompt,
            seed=seed,
            steps=request.steps or d.steps,
            guidance=request.guidance if request.HasField("guidance") else d.guidance,
            sampler=request.sampler or d.sampler,
            shift=request.shift or d.shift,
            strength=request.strength or self.default_strength,
            width=request.width,
            height=request.height,
            inputs=tuple(sorted((name, ref.sha256) for name, ref in request.inputs.items())),
        )
        check_sampling(plan)
        check_strength(plan.strength)
        return plan

    def check_inputs(self, plan: EditPlan, inputs: StoredInputs) -> tuple[int, int]:
        """The input image's (width, height), checked against the requested size; reads image headers only."""
        width, height = inputs.image_size("image")
        for side, want, have in (("width", plan.width, width), ("height", plan.height, height)):
            if want not in (0, have):
                raise InvalidInput(f"{self.name} keeps the input image's size {width}x{height}; leave {side} 0 or "
                                   f"set it to {have}, got {want}", reason="SIZE_MISMATCH", field=side)  # fmt: skip
        return width, height

    def _sample(self, plan: EditPlan, inputs: StoredInputs, c: Mapping[str, Any], callback: Callback | None):
        raise NotImplementedError

    def run(self, plan: EditPlan, bound: Bound, callback: Callback | None) -> list[PipelineOutput]:
        width, height = self.check_inputs(plan, bound.inputs)
        try:
            result = self._sample(plan, bound.inputs, bound.clients, callback)
        except InvalidInput as e:
            raise _edit_field(e) from None
        common = {"negative_prompt": plan.negative_prompt, "steps": plan.steps, "guidance": plan.guidance,
                  "strength": plan.strength, "width": width, "height": height, "sampler": plan.sampler,
                  "shift": plan.shift, "inputs": {name: {"sha256": sha} for name, sha in plan.inputs}}  # fmt: skip
        return image_outputs(self.name, result, plan.prompts, common, bound, bound.inputs.parents)


def _image_input(description: str) -> pb.InputInfo:
    return pb.InputInfo(name="image", description=description, required=True, media_types=list(IMAGE_MEDIA_TYPES))


class ImageToImagePipeline(_EditPipeline):
    """`kinema.pipelines.image_to_image` behind the orchestrator."""

    name = "image_to_image"
    default_strength = 0.8
    description = (
        "Edits an image towards the prompts (SDEdit, Meng et al. 2021, on SD3's rectified flow): the input is "
        "encoded, noised to the flow time of the first step strength leaves and sampled to the end. One PNG per "
        "prompt, the input's size; output i uses seed + i."
    )
    inputs = (_image_input("the image to edit, PNG or JPEG (RGB; alpha is dropped), its sides multiples of the "
                           "model's pixel patch up to 256"),)  # fmt: skip

    def _sample(self, plan: EditPlan, inputs: StoredInputs, c: Mapping[str, Any], callback: Callback | None):
        request = ImageToImageRequest(
            prompts=list(plan.prompts), image=inputs.image("image"), strength=plan.strength, seed=plan.seed,
            steps=plan.steps, guidance=plan.guidance, sampler=plan.sampler, shift=plan.shift,
            negative_prompt=plan.negative_prompt,
        )  # fmt: skip
        return image_to_image(request, c["text_encoder"], c["denoiser"], c["autoencoder"], callback)


class InpaintPipeline(_EditPipeline):
    """`kinema.pipelines.inpaint` behind the orchestrator."""

    name = "inpaint"
    default_strength = 1.0
    description = (
        "Repaints the masked part of an image from the prompts and keeps the rest (latent inpainting: after every "
        "step the kept region is reset to the input's latents noised to that step's time; Rombach et al. 2022, "
        "LDM; SDEdit strength inside the mask). One PNG per prompt, the input's size; output i uses seed + i."
    )
    inputs = (
        _image_input(
            "the image to repaint, PNG or JPEG (RGB; alpha is dropped), its sides multiples of the "
            "model's pixel patch up to 256"
        ),
        pb.InputInfo(
            name="mask",
            description="same size as the image, read as greyscale: pixels >= 128 are regenerated, pixels < 128 kept",
            required=True,
            media_types=list(IMAGE_MEDIA_TYPES),
        ),
    )

    def check_inputs(self, plan: EditPlan, inputs: StoredInputs) -> tuple[int, int]:
        width, height = super().check_inputs(plan, inputs)
        mask_width, mask_height = inputs.image_size("mask")
        if (mask_width, mask_height) != (width, height):
            raise InvalidInput(f"inputs.mask is {mask_width}x{mask_height} pixels, the image {width}x{height}: "
                               "they must be the same size", reason="SIZE_MISMATCH", field="inputs.mask")  # fmt: skip
        return width, height

    def _sample(self, plan: EditPlan, inputs: StoredInputs, c: Mapping[str, Any], callback: Callback | None):
        request = InpaintRequest(
            prompts=list(plan.prompts), image=inputs.image("image"), mask=inputs.image("mask", mode="L"),
            strength=plan.strength, seed=plan.seed, steps=plan.steps, guidance=plan.guidance, sampler=plan.sampler,
            shift=plan.shift, negative_prompt=plan.negative_prompt,
        )  # fmt: skip
        return inpaint(request, c["text_encoder"], c["denoiser"], c["autoencoder"], callback)


VIDEO_MEDIA_TYPES = ("video/mp4", "video/quicktime", "video/webm")
# A library edit_video error's field -> the PipelineRequest field it is about.
_VIDEO_FIELDS = {"prompt": "prompts", "video": "inputs.video", "content_image": "inputs.content_image",
                 "structure": "options.structure", "temporal_guidance": "options.temporal_guidance",
                 "window": "options.window", "overlap": "options.overlap"}  # fmt: skip
# options.<key> edit_video reads: (default, integer?). Defaults are the library's (EditVideoRequest); frames 0: all;
# overlap None: half the window (`default_overlap`).
_VIDEO_OPTIONS = {"structure": (EditVideoRequest.structure, False),
                  "temporal_guidance": (EditVideoRequest.temporal_guidance, False),
                  "window": (EditVideoRequest.window, True), "overlap": (None, True), "frames": (0, True)}  # fmt: skip


def _video_field(e: InvalidInput) -> InvalidInput:
    """`e` naming the PipelineRequest field ('inputs.video', 'options.window') rather than the library's."""
    field = _VIDEO_FIELDS.get(e.field)
    if field is None:
        return e
    message = str(e).removeprefix(f"{e.field}: ")  # the video reader starts its messages with its field
    return InvalidInput(f"{field}: {message}", reason=e.reason or "OUT_OF_RANGE", field=field, metadata=e.metadata)


def _video_options(request: pb.PipelineRequest) -> dict[str, float | int]:
    """options.<key> with the defaults filled in; InvalidInput naming `options.<key>` for an unknown key or value."""
    given = json_format.MessageToDict(request.options) if request.HasField("options") else {}
    values: dict[str, float | int] = {}
    for key, (default, integer) in _VIDEO_OPTIONS.items():
        value = given.pop(key, default)
        if value is None:  # overlap: half the window (already read, the order above)
            value = default_overlap(int(values["window"]))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidInput(f"options.{key} must be a number, got {value!r}", reason="OUT_OF_RANGE",
                               field=f"options.{key}")  # fmt: skip
        if integer and not float(value).is_integer():
            raise InvalidInput(f"options.{key} must be a whole number, got {value!r}", reason="OUT_OF_RANGE",
                               field=f"options.{key}")  # fmt: skip
        values[key] = int(value) if integer else float(value)
    if given:  # what is left is not an option edit_video reads
        key = min(given)
        raise InvalidInput(f"pipeline 'edit_video' reads no option {key!r}; it reads {sorted(_VIDEO_OPTIONS)}",
                           reason="UNUSED_OPTION", field=f"options.{key}")  # fmt: skip
    if values["frames"] < 0:
        raise InvalidInput(f"options.frames must be >= 0 (0: every frame), got {values['frames']}",
                           reason="OUT_OF_RANGE", field="options.frames")  # fmt: skip
    if values["window"] < 2:  # the upper bound, the video model's max_frames, is checked once it answers
        raise InvalidInput(f"options.window must be at least 2 frames, got {values['window']}", reason="OUT_OF_RANGE",
                           field="options.window")  # fmt: skip
    return values


@dataclass(frozen=True)
class VideoPlan:
    """A checked edit_video request, every default filled in; the video and the content image are read at run time,
    so `request.content_image` stays None here."""

    request: EditVideoRequest
    frames: int  # edit only the first `frames` frames; 0: all
    inputs: tuple[tuple[str, str], ...]  # (name, sha256) as requested

    @property
    def has_content_image(self) -> bool:
        return any(name == "content_image" for name, _ in self.inputs)


class EditVideoPipeline:
    """`kinema.pipelines.edit_video` behind the orchestrator: the uploaded video is decoded within the server's video
    limits (`OrchestratorSettings.media_limits`), edited over the text encoder, depth, video denoiser and autoencoder
    services, encoded to an H.264 MP4 in a temporary folder and stored only once it is whole."""

    name = "edit_video"
    capabilities = ("autoencoder", "depth", "text_encoder", "video_denoiser")
    seed_limit = 2**63 // NOISE_STRIDE  # frame i of seed s draws from s * NOISE_STRIDE + i
    defaults = EditVideoRequest()
    _reads = frozenset({"prompts", "negative_prompt", "seed", "steps", "guidance", "width", "height", "shift",
                        "strength", "inputs", "options", "models"})  # fmt: skip
    inputs = (
        pb.InputInfo(name="video", required=True, media_types=list(VIDEO_MEDIA_TYPES),
                     description="the video to edit (H.264, HEVC, VP9, AV1, ...), within the server's limits on "
                                 "frames, seconds and frame size; its frames are centre-cropped to the output's "
                                 "aspect and resized"),
        pb.InputInfo(name="content_image", required=False, media_types=list(IMAGE_MEDIA_TYPES),
                     description="content from an image instead of a prompt (keyframe propagation): its colours and "
                                 "look carry through the clip; sides up to 256 pixels. Exactly one of prompts and "
                                 "content_image"),
    )  # fmt: skip

    def info(self) -> pb.PipelineInfo:
        d = self.defaults
        return pb.PipelineInfo(
            name=self.name,
            description=(
                "Edits a video from a prompt or a content image while keeping its structure (Gen-1, Esser et al. "
                "2023): per-frame depth (MiDaS-style, degraded to the structure level t_s) conditions a video "
                "MMDiT with temporal layers, sampled with classifier-free and temporal guidance; a clip longer than "
                "the window is sampled whole, its overlapping windows' velocities blended at every step, so no seam "
                "shows. One H.264 MP4 at the input's frame rate."
            ),
            inputs=list(self.inputs),
            parameters=[
                _param("prompts", "one prompt: what the video should show; leave empty with inputs.content_image"),
                _param("negative_prompt", "the prompt guidance steers away from", d.negative_prompt),
                _param("seed", f"noise seed in [0, {self.seed_limit}); unset: drawn by the server"),
                _param("steps", "sampling steps of the full schedule, 1..1000", d.steps),
                _param("guidance", "classifier-free guidance scale omega in [0, 30] (1: none)", d.guidance),
                _param(
                    "strength",
                    "1 samples from noise; less starts from the input frames (SDEdit), in (0, 1]",
                    d.strength,
                ),
                _param("shift", "timestep shift s > 0 of the schedule (SD3 eq. 23)", d.shift),
                _param("width", "output width in pixels, a multiple of the model's pixel patch up to 256", d.width),
                _param("height", "output height in pixels, as width", d.height),
                _param(
                    "options.structure",
                    "structure level t_s in [0, 1]: 0 follows the input's depth closely, 1 keeps only its rough layout",
                    d.structure,
                ),
                _param(
                    "options.temporal_guidance",
                    "temporal guidance omega_t in [0, 10]: 0 samples each frame alone, 1 as a video, more is steadier",
                    d.temporal_guidance,
                ),
                _param("options.window", "frames the video model sees at once, 2 to its max_frames", d.window),
                _param(
                    "options.overlap",
                    "frames two neighbouring windows share, 0..window-1; unset: half the window",
                    d.overlap,
                ),
                _param("options.frames", "edit only the first N frames; 0: every frame", 0),
            ],
            capabilities=list(self.capabilities),
            output_media_type="video/mp4",
        )

    def prepare(self, request: pb.PipelineRequest, max_batch: int) -> VideoPlan:
        reject_unread(request, self.name, self._reads, self.capabilities)
        names = {i.name for i in self.inputs}
        for name in sorted(request.inputs):
            if name not in names:
                raise InvalidInput(f"pipeline {self.name!r} reads no input {name!r}; it reads {sorted(names)}",
                                   reason="UNUSED_INPUT", field=f"inputs.{name}")  # fmt: skip
        if "video" not in request.inputs:
            raise InvalidInput(f"{self.name} needs inputs.video: the video to edit (upload it first)",
                               reason="MISSING", field="inputs.video")  # fmt: skip
        image = "content_image" in request.inputs
        if len(request.prompts) > 1:
            raise InvalidInput(f"{self.name} makes one video from one prompt, got {len(request.prompts)} prompts",
                               reason="OUT_OF_RANGE", field="prompts")  # fmt: skip
        prompt = request.prompts[0] if request.prompts else ""
        if image and request.prompts:
            raise InvalidInput("give the content as prompts or as inputs.content_image, not both", reason="CONFLICT",
                               field="prompts")  # fmt: skip
        if not image and not prompt.strip():
            raise InvalidInput("give the content as one non-empty prompt or as inputs.content_image",
                               reason="MISSING", field="prompts")  # fmt: skip
        if request.HasField("seed") and request.seed >= self.seed_limit:
            raise InvalidInput(f"seed must be in [0, {self.seed_limit}), got {request.seed}", reason="OUT_OF_RANGE",
                               field="seed")  # fmt: skip
        options = _video_options(request)
        d = self.defaults
        library = EditVideoRequest(
            prompt=prompt,
            negative_prompt=request.negative_prompt,
            structure=options["structure"],
            temporal_guidance=options["temporal_guidance"],
            guidance=request.guidance if request.HasField("guidance") else d.guidance,
            steps=request.steps or d.steps,
            strength=request.strength or d.strength,
            shift=request.shift or d.shift,
            seed=request.seed if request.HasField("seed") else secrets.randbelow(self.seed_limit),
            width=request.width or d.width,
            height=request.height or d.height,
            window=int(options["window"]),
            overlap=int(options["overlap"]),
        )
        try:  # all but the model's patch and max_frames (known once the services answer) and the content image
            replace(library, prompt=prompt or "(inputs.content_image)").validate(patch=1, max_window=library.window)
        except InvalidInput as e:
            raise _video_field(e) from None
        inputs = tuple(sorted((name, ref.sha256) for name, ref in request.inputs.items()))
        return VideoPlan(library, int(options["frames"]), inputs)

    def check_inputs(self, plan: VideoPlan, inputs: StoredInputs) -> VideoInfo:
        """The video's header against the server's limits (frames, seconds, frame size) and the content image's
        size; reads headers only (SubmitJob calls it too)."""
        with open_video(inputs.read("video"), "inputs.video", inputs.limits.video) as reader:
            info = reader.info
        if plan.has_content_image:
            width, height = inputs.image_size("content_image")
            if max(width, height) > MAX_SIZE:
                raise InvalidInput(f"inputs.content_image is {width}x{height} pixels, at most {MAX_SIZE} per side",
                                   reason="OUT_OF_RANGE", field="inputs.content_image")  # fmt: skip
        return info

    def run(self, plan: VideoPlan, bound: Bound, callback: Callback | None) -> list[PipelineOutput]:
        self.check_inputs(plan, bound.inputs)
        inputs, c = bound.inputs, bound.clients
        request = plan.request
        if plan.has_content_image:
            request = replace(request, content_image=inputs.image("content_image"))
        # The MP4 is written in a folder of its own and read back only once it is whole (VideoWriter renames it into
        # place on a clean close); an error or a cancel mid-way leaves nothing, and nothing is stored.
        with tempfile.TemporaryDirectory(prefix="kinema-edit-video-") as folder:
            path = Path(folder) / "edit.mp4"
            try:
                result = edit_video_file(request, inputs.read("video"), path, c["text_encoder"], c["depth"],
                                         c["video_denoiser"], c["autoencoder"], callback, limits=inputs.limits.video,
                                         first_frames=plan.frames or None)  # fmt: skip
            except InvalidInput as e:
                raise _video_field(e) from None
            data = path.read_bytes()  # at most a few MB at the pipeline's sizes (256 px, the server's max frames)
        r = plan.request
        options = {"structure": r.structure, "temporal_guidance": r.temporal_guidance, "window": r.window,
                   "overlap": r.overlap, "frames": plan.frames}  # fmt: skip
        parameters = {
            "pipeline": self.name,
            "prompts": [r.prompt] if r.prompt else [],
            "negative_prompt": r.negative_prompt,
            "seed": str(r.seed),  # proto3 JSON writes 64-bit integers as strings: exact through ParseDict
            "steps": r.steps, "guidance": r.guidance, "strength": r.strength, "shift": r.shift,
            "width": r.width, "height": r.height, "options": options,
            "inputs": {name: {"sha256": sha} for name, sha in plan.inputs},
            "models": {cap: dict(ref) for cap, ref in bound.models.items()},
        }  # fmt: skip
        models = {cap: sha for cap, sha in result.models.items() if sha}
        return [PipelineOutput(0, data, "video/mp4", r.seed, result.truncated, parameters, models, inputs.parents)]


REGISTRY = Registry()
REGISTRY.register(TextToImagePipeline())
REGISTRY.register(ImageToImagePipeline())
REGISTRY.register(InpaintPipeline())
REGISTRY.register(EditVideoPipeline())

__all__ = ["REGISTRY", "EditPlan", "EditVideoPipeline", "ImageToImagePipeline", "InpaintPipeline", "Pipeline",
           "PipelineOutput", "PreparedTextToImage", "Registry", "TextToImagePipeline", "VideoPlan", "prompts_and_seed",
           "reject_unread"]  # fmt: skip
