"""The pipelines the orchestrator serves, by name.

Each is a small adapter over a library pipeline (`kinema.pipelines`): `prepare` checks a
`kinema.orchestrator.v1.PipelineRequest` and fills in its defaults without calling any service, `run` runs it
over bound capability clients in a worker thread, and `info` describes it for ListPipelines. A later pipeline
registers itself with `REGISTRY.register(...)`; the service does not change.
"""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass, replace
from typing import Any, Protocol

from google.protobuf import struct_pb2
from PIL import Image

from kinema.errors import InvalidInput, NotFound
from kinema.orchestration.capabilities import Bound
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.pipelines.text_to_image import TextToImageRequest, text_to_image
from kinema.sampling.samplers import Callback

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


class Pipeline(Protocol):
    """What the orchestrator needs of a pipeline."""

    name: str
    capabilities: tuple[str, ...]  # the keys it accepts in PipelineRequest.models

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


class TextToImagePipeline:
    """`kinema.pipelines.text_to_image` behind the orchestrator."""

    name = "text_to_image"
    capabilities = ("autoencoder", "denoiser", "text_encoder")
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
                _param("steps", "sampling steps, 1..1000", d.steps),
                _param("guidance", "classifier-free guidance scale >= 0 (1: none)", d.guidance),
                _param("width", "image side in pixels, a multiple of the model's pixel patch up to 256", d.size),
                _param("height", "must equal width (square images only)", d.size),
                _param("sampler", "ODE sampler: 'euler' or 'heun'", d.sampler),
                _param("shift", "timestep shift s > 0 of the schedule (SD3 eq. 23)", d.shift),
            ],
            capabilities=list(self.capabilities),
            output_media_type="image/png",
        )

    def prepare(self, request: pb.PipelineRequest, max_batch: int) -> TextToImageRequest:
        reject_unread(request, self.name, self._reads, self.capabilities)
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
        width, height = request.width or self.defaults.size, request.height or self.defaults.size
        if width != height:
            raise InvalidInput(f"{self.name} makes square images: width {width} != height {height}",
                               reason="NOT_SQUARE", field="width")  # fmt: skip
        if request.HasField("seed"):
            seed = request.seed
            if seed + n > SEED_LIMIT:
                raise InvalidInput(f"seed + {n - 1} (the last output's seed) must be < 2**63, got seed {seed}",
                                   reason="OUT_OF_RANGE", field="seed")  # fmt: skip
        else:
            seed = secrets.randbelow(SEED_LIMIT - max_batch)
        prepared = replace(
            self.defaults,
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

    def run(self, prepared: TextToImageRequest, bound: Bound, callback: Callback | None) -> list[PipelineOutput]:
        c = bound.clients
        try:
            result = text_to_image(prepared, c["text_encoder"], c["denoiser"], c["autoencoder"], callback)
        except InvalidInput as e:
            raise _with_field(e) from None
        models = {cap: sha for cap, sha in result.models.items() if sha}
        outputs = []
        for i, (image, prompt, seed, cut) in enumerate(
            zip(result.images, prepared.prompts, result.seeds, result.truncated, strict=True)
        ):
            parameters = {
                "pipeline": self.name,
                "prompts": [prompt],
                "negative_prompt": prepared.negative_prompt,
                "seed": str(seed),  # proto3 JSON writes 64-bit integers as strings: exact through ParseDict
                "steps": prepared.steps,
                "guidance": prepared.guidance,
                "width": prepared.size,
                "height": prepared.size,
                "sampler": prepared.sampler,
                "shift": prepared.shift,
                "models": {cap: dict(ref) for cap, ref in bound.models.items()},
            }
            outputs.append(PipelineOutput(i, png(image), "image/png", seed, bool(cut), parameters, models))
        return outputs


REGISTRY = Registry()
REGISTRY.register(TextToImagePipeline())

__all__ = ["REGISTRY", "Pipeline", "PipelineOutput", "Registry", "TextToImagePipeline", "reject_unread"]
