"""What every model service shares: model selection, ModelInfo, batch limits and the network call.

A service owns one model family; a request's `ModelRef` names one of its models (empty: the default)
and an optional version (empty: the newest loaded). Family members follow the repository's naming:
the default name itself or `<family>_<variant>`, the family being the default name unless a service says
otherwise (e.g. `denoiser`, `denoiser_sd3`; `iin_factor`, `iin_net2net` in the family `iin`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import numpy as np

from kinema.common.v1 import common_pb2
from kinema.errors import InvalidInput, NotFound
from kinema.inference.runner import ModelRunner, ServedModel
from kinema.rpc import tensors
from kinema.rpc.server import remaining_seconds
from kinema.rpc.settings import ServiceSettings

T = TypeVar("T")

# Threads that wait on Triton (or run a sampling loop that does): asyncio's default pool has only
# cpu_count + 4 of them, which would cap concurrent Sample streams, and with them dynamic batching.
MAX_BLOCKING_CALLS = 64


MAX_IMAGE_SIDE = 1024  # longest image side a model service takes
CHEAP_METHOD = "ListModels"  # the one RPC of a model service that runs no network: never refused for load


# A Triton model version: a positive integer in ASCII digits, no leading zero, small enough for Triton's int64.
_VERSION = re.compile(r"[1-9][0-9]{0,17}")


MAX_PIXEL = 2.0  # |value| an image tensor may reach: [-1, 1] with room for a decoder's overshoot


def check_version(version: str, field: str) -> None:
    """INVALID_ARGUMENT naming `field` unless `version` is "" (the latest) or a version number Triton accepts."""
    if version and not _VERSION.fullmatch(version):
        raise InvalidInput(f"{field} must be a positive integer such as 1 (or empty for the latest), got "
                           f"{version!r:.40}", reason="INVALID_VERSION", field=field)  # fmt: skip


class ModelFamily:
    """A runner, the family's default model name and the settings bounding each request."""

    def __init__(self, runner: ModelRunner, settings: ServiceSettings, default: str, family: str = "",
                 info: Callable[[ServedModel], common_pb2.ModelInfo] | None = None) -> None:  # fmt: skip
        """`info`: a served model's ModelInfo (default `model_info`); it raises NotFound for a model of the family's
        names that is not of its kind (a distill service's teacher), which ListModels then leaves out."""
        self.runner = runner
        self.settings = settings
        self.default = default
        self.family = family or default
        self.info = info or model_info
        self._pool = ThreadPoolExecutor(MAX_BLOCKING_CALLS, thread_name_prefix=f"{default}-call")

    async def run_blocking(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on the family's thread pool, with the request's context (request id for logs)."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: ctx.run(fn, *args))

    def resolve(self, ref: common_pb2.ModelRef) -> tuple[str, str]:
        """(model name, version) for a request's ModelRef; NOT_FOUND outside the family."""
        name = ref.name or self.default
        if not self.member(name):
            raise NotFound(
                f"model {name!r} is not a {self.family} model; ListModels shows what this service serves",
                reason="MODEL_NOT_FOUND",
                field="model.name",
            )
        check_version(ref.version, "model.version")
        return name, ref.version

    def member(self, name: str) -> bool:
        return name == self.default or name.startswith(self.family + "_")

    def check_batch(self, n: int, field: str) -> None:
        if n > self.settings.max_batch:
            raise InvalidInput(
                f"{field}: batch of {n} is over this service's limit of {self.settings.max_batch}; split the request",
                reason="BATCH_TOO_LARGE",
                field=field,
            )

    def images(self, t: common_pb2.Tensor, field: str = "images", max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
        """A request's image batch (B, 3, H, W) float32 with 0 < H, W <= max_side, within the batch limit."""
        images = tensors.decode(t, field, np.float32, ndim=4)  # (B, 3, H, W)
        self.check_batch(images.shape[0], field)
        if images.shape[1] != 3 or max(images.shape[2:]) > max_side or min(images.shape) == 0:
            raise InvalidInput(
                f"{field}: expected (B, 3, H, W) with 0 < H, W <= {max_side}, got {tuple(images.shape)}",
                reason="INVALID_SHAPE", field=field,
            )  # fmt: skip
        peak = float(np.abs(images).max())
        if peak > MAX_PIXEL:  # far outside [-1, 1] is not an image (e.g. 0..255), and overflows in the networks
            raise InvalidInput(f"{field}: pixel values must lie in [-1, 1] (e.g. uint8 / 127.5 - 1), got |value| up "
                               f"to {peak:.3g}", reason="OUT_OF_RANGE", field=field)  # fmt: skip
        return images

    async def call(
        self, context: grpc.aio.ServicerContext, model: str, version: str, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """One network evaluation off the event loop, bounded by the request's remaining time."""
        timeout = remaining_seconds(context, self.settings)
        return await self.run_blocking(self.runner.infer, model, inputs, version, timeout)

    async def describe(self, model: str, version: str) -> common_pb2.ModelInfo:
        served = await self.run_blocking(self.runner.describe, model, version)
        return self.info(served)

    async def list_models(
        self, ref: common_pb2.ModelRef | None = None, members: Iterable[str] | None = None
    ) -> list[common_pb2.ModelInfo]:
        """ModelInfo of the family's loaded models (or the given runner model names), filtered by `ref`.

        A filter that matches nothing gives an empty list, not an error; a version Triton would not take is
        INVALID_ARGUMENT, under either backend.
        """
        if ref is not None:
            check_version(ref.version, "model.version")
        if members is None:
            names = await self.run_blocking(self.runner.models)
            members = [n for n in names if self.member(n)]
        infos = []
        for name in members:
            if ref is not None and ref.name and ref.name != name and not name.startswith(ref.name + "_"):
                continue
            try:
                info = await self.describe(name, ref.version if ref is not None else "")
            except NotFound:
                continue
            infos.append(info)
        return infos


def model_info(served: ServedModel) -> common_pb2.ModelInfo:
    params = served.params_json
    if params:
        params = json.dumps(json.loads(params), sort_keys=True)
    return common_pb2.ModelInfo(name=served.name, version=served.version, sha256=served.sha256, params_json=params)


def build_model_server(
    settings: ServiceSettings,
    *,
    name: str,
    service: str,
    add_to_server: Callable,
    servicer: Callable[[ModelFamily], object],
    default_model: str,
    family: str = "",
    info: Callable[[ServedModel], common_pb2.ModelInfo] | None = None,
):
    """The `build_server` of every model service: metrics, the runner the settings choose, one binding.

    `family`: the name prefix of the service's models when it is not `default_model` itself; `info`: see
    ModelFamily. Every RPC of the service but ListModels calls the network, so each holds one of the
    `max_in_flight` places (kinema.rpc.admission).
    """
    from google.protobuf import descriptor_pool

    from kinema.inference.runner import make_runner
    from kinema.rpc.metrics import ServerMetrics
    from kinema.rpc.server import Binding, make_server
    from kinema.rpc.tls import internal_credentials

    metrics = ServerMetrics()
    runner = make_runner(settings.backend, models=settings.models_dir, triton_url=settings.triton_url, observer=metrics,
                         credentials=internal_credentials(settings))  # fmt: skip
    methods = {m.name for m in descriptor_pool.Default().FindServiceByName(service).methods}
    binding = Binding(service, add_to_server, servicer(ModelFamily(runner, settings, default_model, family, info)),
                      limited=frozenset(methods - {CHEAP_METHOD}))  # fmt: skip
    return make_server(settings, [binding], name, metrics)
