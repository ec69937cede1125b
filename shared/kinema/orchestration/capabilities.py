"""The model services as capabilities: long-lived channels, per-model clients (cached, so model facts are asked
once) and the services' ListModels, for the orchestrator to bind a pipeline run to.

The distill service is optional (KINEMA_DISTILL_URL). Where it is set, its students stand in for the denoiser: a
run that names a denoiser model the distill service lists gets a `RemoteStudent` as its denoiser (and the pipeline
samples with the few-step sampler), and ListModels lists the students among the denoiser's models.

The video pipeline's capabilities: `video_denoiser` is the denoiser service's video model (`RemoteVideoDenoiser`,
SampleVideo; its default is the service's `default_video_model`), on the denoiser's channel; `depth` is the depth
service (`RemoteDepth`), optional (KINEMA_DEPTH_URL): without it a run that needs depth is FAILED_PRECONDITION.
"""

from __future__ import annotations

import contextvars
import copy
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from kinema.autoencoder.v1 import autoencoder_pb2, autoencoder_pb2_grpc
from kinema.common.v1 import common_pb2
from kinema.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from kinema.depth.v1 import depth_pb2, depth_pb2_grpc
from kinema.distill.v1 import distill_pb2, distill_pb2_grpc
from kinema.errors import FailedPrecondition, KinemaError, NotFound, Unavailable
from kinema.orchestration.inputs import NO_INPUTS, StoredInputs
from kinema.pipelines.remote import (
    RemoteAutoencoder,
    RemoteDenoiser,
    RemoteDepth,
    RemoteTextEncoder,
    RemoteVideoDenoiser,
    open_channel,
)
from kinema.pipelines.remote_distill import RemoteStudent
from kinema.rpc.logs import request_id as current_request_id
from kinema.rpc.status import from_rpc_error
from kinema.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc

_LOGGER = logging.getLogger(__name__)

CAPABILITIES = ("autoencoder", "denoiser", "text_encoder")  # sorted, as ListModels answers them
STUDENTS = "distill"  # the optional service whose few-step students stand in for the denoiser
DEPTH = "depth"  # the optional depth service (the video pipeline's structure)
VIDEO_DENOISER = "video_denoiser"  # the denoiser service's video models, on the denoiser's channel
# The setting that names each optional service, for the error a run gets when it is not set.
_OPTIONAL_SETTINGS = {DEPTH: "KINEMA_DEPTH_URL", STUDENTS: "KINEMA_DISTILL_URL"}

_LIST_MODELS: dict[str, tuple[Any, Any]] = {
    "text_encoder": (text_encoder_pb2_grpc.TextEncoderStub, text_encoder_pb2.ListModelsRequest),
    "denoiser": (denoiser_pb2_grpc.DenoiserStub, denoiser_pb2.ListModelsRequest),
    "autoencoder": (autoencoder_pb2_grpc.AutoencoderStub, autoencoder_pb2.ListModelsRequest),
    STUDENTS: (distill_pb2_grpc.DistillStub, distill_pb2.ListModelsRequest),
    DEPTH: (depth_pb2_grpc.DepthStub, depth_pb2.ListModelsRequest),
    VIDEO_DENOISER: (denoiser_pb2_grpc.DenoiserStub, denoiser_pb2.ListModelsRequest),
}
_CHANNEL_OF = {VIDEO_DENOISER: "denoiser"}  # a capability served by another capability's service


@dataclass(frozen=True)
class Catalog:
    """One service's ListModels answer."""

    models: list[common_pb2.ModelInfo]
    default_model: str


@dataclass(frozen=True)
class Bound:
    """The clients of one run, by capability, the models they resolve to ({"name", "version"} each) and the
    run's input artifacts (`kinema.orchestration.inputs`; none unless the caller resolved them)."""

    clients: Mapping[str, Any]
    models: Mapping[str, dict[str, str]]
    inputs: StoredInputs = NO_INPUTS


class RemoteCapabilities:
    """Channels to the model services, opened once; clients per (capability, model, version), cached."""

    def __init__(self, addresses: Mapping[str, str], credentials: grpc.ChannelCredentials | None = None) -> None:
        """`addresses`: host:port of each capability's service, and optionally of the distill service (STUDENTS);
        `credentials`: TLS on every channel (`kinema.rpc.tls.internal_credentials`), None: plaintext."""
        self.channels = {cap: open_channel(addresses[cap], credentials) for cap in CAPABILITIES}
        for optional in (STUDENTS, DEPTH):
            if addresses.get(optional):
                self.channels[optional] = open_channel(addresses[optional], credentials)
        self._clients: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        # A run's ListModels calls go out at once (one per capability): bind costs one round trip, not three.
        self._lists = ThreadPoolExecutor(32, thread_name_prefix="capabilities-list")

    def close(self) -> None:
        self._lists.shutdown(wait=False, cancel_futures=True)
        for channel in self.channels.values():
            channel.close()

    @property
    def listed(self) -> list[str]:
        """The capabilities ListModels answers for, sorted: the three, the video denoiser, and depth where set."""
        return sorted({*CAPABILITIES, VIDEO_DENOISER, *([DEPTH] if DEPTH in self.channels else [])})

    def require(self, capabilities: tuple[str, ...]) -> None:
        """FailedPrecondition naming the setting of the first optional service `capabilities` need that is not set."""
        for cap in capabilities:
            if _CHANNEL_OF.get(cap, cap) not in self.channels:
                setting = _OPTIONAL_SETTINGS.get(cap, f"KINEMA_{cap.upper()}_URL")
                raise FailedPrecondition(f"this server has no {cap} service ({setting} is not set), which the "
                                         "pipeline needs; ask its operator", reason="CAPABILITY_NOT_CONFIGURED",
                                         metadata={"capability": cap, "setting": setting})  # fmt: skip

    def catalog(self, capability: str, timeout: float, ref: common_pb2.ModelRef | None = None) -> Catalog:
        """The service's ListModels (filtered by `ref`); a failed call raises its domain error (e.g. Unavailable).

        Unfiltered, the denoiser's catalog also lists the distill service's students (the distill service's entry
        wins for a model both list: it names the student's teacher and schedule); a distill service that does not
        answer leaves them out rather than failing the listing.
        """
        catalog = self._list(capability, timeout, ref)
        if capability != "denoiser" or ref is not None or STUDENTS not in self.channels:
            return catalog
        try:
            students = self._list(STUDENTS, timeout)
        except KinemaError:
            _LOGGER.warning("the distill service did not answer ListModels: students left out", exc_info=True)
            return catalog
        merged = {(m.name, m.version): m for m in catalog.models}
        merged.update({(m.name, m.version): m for m in students.models})
        return Catalog(list(merged.values()), catalog.default_model)

    def _student(self, ref: common_pb2.ModelRef, timeout: float) -> Catalog | None:
        """The distill service's catalog when `ref` names one of its students; None when it does not (or there is
        no distill service, or `ref` names no model: the denoiser's default is no student)."""
        if not ref.name or STUDENTS not in self.channels:
            return None
        try:
            catalog = self._list(STUDENTS, timeout, ref)
        except Unavailable as e:
            raise Unavailable(f"the distill service did not answer, so whether denoiser model {ref.name!r} is a "
                              f"few-step student is unknown: {e}", reason=e.reason) from None  # fmt: skip
        return catalog if any(m.name == ref.name for m in catalog.models) else None

    def _list(self, capability: str, timeout: float, ref: common_pb2.ModelRef | None = None) -> Catalog:
        """One service's ListModels, as it answers; for the video denoiser, the denoiser service's video models (those
        whose params_json states max_frames) and its default video model."""
        stub_type, request_type = _LIST_MODELS[capability]
        stub = stub_type(self.channels[_CHANNEL_OF.get(capability, capability)])
        rid = current_request_id()
        try:
            reply = stub.ListModels(request_type(model=ref or common_pb2.ModelRef()), timeout=timeout,
                                    metadata=(("x-request-id", rid),) if rid else ())  # fmt: skip
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        if capability == VIDEO_DENOISER:
            videos = [m for m in reply.models if "max_frames" in json.loads(m.params_json or "{}")]
            return Catalog(videos, reply.default_video_model)
        return Catalog(list(reply.models), reply.default_model)

    def _client(self, capability: str, ref: common_pb2.ModelRef, ae: RemoteAutoencoder | None = None) -> Any:
        key = (capability, ref.name, ref.version) + ((ae.model, ae.version) if ae is not None else ())
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                channel = self.channels[_CHANNEL_OF.get(capability, capability)]
                if capability == "text_encoder":
                    client = RemoteTextEncoder(channel, ref.name, ref.version)
                elif capability == "autoencoder":
                    client = RemoteAutoencoder(channel, ref.name, ref.version)
                elif capability == DEPTH:
                    client = RemoteDepth(channel, ref.name, ref.version)
                elif capability == VIDEO_DENOISER:  # latent channels and max frames: from the model's params
                    client = RemoteVideoDenoiser(channel, ref.name, ref.version)
                elif capability == STUDENTS:  # a student works in the autoencoder's latent space, as its teacher
                    assert ae is not None
                    client = RemoteStudent(channel, ref.name, ref.version, latent_channels=lambda: ae.latent_channels)
                else:  # the denoiser works in the autoencoder's latent space
                    assert ae is not None
                    client = RemoteDenoiser(channel, ref.name, ref.version, latent_channels=lambda: ae.latent_channels)
                self._clients[key] = client
        return client

    def bind(
        self, capabilities: tuple[str, ...], overrides: Mapping[str, common_pb2.ModelRef], timeout: float
    ) -> Bound:
        """Clients for `capabilities`, each bounded by `timeout` seconds per call, and the models they resolve to.

        A model left out resolves to the service's default; a version left out to the newest it lists. A denoiser
        model the distill service lists binds a `RemoteStudent` on it. The request id travels from the calling
        thread's request (`kinema.rpc.logs`). FailedPrecondition for an optional service that is not set.

        A run that names a model (or version) waits here for the services' catalogs: a model they do not list is
        NOT_FOUND before anything runs. A run of the defaults asks no catalog: its `models`, read once the run is
        done, are the models its clients' responses named (`served()`: what ran); a client no response has named yet
        asks its service's catalog then.
        """
        self.require(capabilities)
        empty = common_pb2.ModelRef()
        refs = {cap: overrides.get(cap, empty) for cap in capabilities}
        ae = self._client("autoencoder", refs["autoencoder"]) if "autoencoder" in refs else None

        if not any(ref.name or ref.version for ref in refs.values()):
            # Three ListModels calls per run, sent at its first step, slowed that step by about 3 ms on 2 cores; the
            # responses already name what ran (docs/serving.md).
            clients = {cap: ae if cap == "autoencoder" else self._client(cap, empty, ae) for cap in capabilities}
            scoped = self._scoped(clients, timeout)
            return Bound(scoped, _Served(scoped, lambda cap: _resolved_model(cap, empty, self._list(cap, timeout))))

        def resolve(cap: str) -> tuple[Any, Catalog]:
            student = self._student(refs[cap], timeout) if cap == "denoiser" else None
            if student is not None:
                return self._client(STUDENTS, refs[cap], ae), student
            client = ae if cap == "autoencoder" else self._client(cap, refs[cap], ae)
            return client, self._list(cap, timeout, refs[cap])

        # The ListModels calls go out at once (the pool's threads get the request id): one round trip, not one each.
        ctx = contextvars.copy_context()
        pending = {cap: self._lists.submit(ctx.copy().run, resolve, cap) for cap in capabilities}
        resolved = {cap: future.exception() or future.result() for cap, future in pending.items()}
        clients, models = {}, {}
        for cap in capabilities:
            if isinstance(resolved[cap], BaseException):
                raise resolved[cap]  # the first failing capability's error, in the pipeline's order
            clients[cap], catalog = resolved[cap]
            models[cap] = _resolved_model(cap, refs[cap], catalog)
        return Bound(self._scoped(clients, timeout), models)

    @staticmethod
    def _scoped(clients: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Copies of `clients` with a deadline of their own; they share channel and cached model facts."""
        scoped = {}
        for cap, client in clients.items():
            scoped[cap] = copy.copy(client)
            scoped[cap].timeout = timeout
        return scoped


def _resolved_model(cap: str, ref: common_pb2.ModelRef, catalog: Catalog) -> dict[str, str]:
    """{"name", "version"} of the model `ref` resolves to in `catalog` (the service's ListModels filtered by `ref`):
    the service's default when `ref` names none, the newest listed version when it names none; NOT_FOUND when the
    service listed nothing for a `ref` that names a model."""
    name = ref.name or catalog.default_model
    if (ref.name or ref.version) and not catalog.models:  # the service filtered by the override
        raise NotFound(
            f"the {cap} service serves no model {name!r} version {ref.version or '(newest)'}; "
            "ListModels shows what it serves",
            reason="MODEL_NOT_FOUND",
            field=f"models.{cap}",
        )
    # The autoencoder service lists model `vae` as its two networks, `vae_encoder` and `vae_decoder`.
    listed = {name, f"{name}_encoder"} if cap == "autoencoder" else {name}
    versions = [m.version for m in catalog.models if m.name in listed and m.version.isdigit()]
    return {"name": name, "version": ref.version or (max(versions, key=int) if versions else "")}


class _Served(Mapping[str, dict[str, str]]):
    """`Bound.models` of a run of the default models: on first read, the model that answered each capability's client
    (`served()`), or what `ask(cap)` resolves for a client that no response has named yet; later reads see the same."""

    def __init__(self, clients: Mapping[str, Any], ask: Callable[[str], dict[str, str]]) -> None:
        self._clients, self._ask = clients, ask
        self._models: dict[str, dict[str, str]] | None = None
        self._lock = threading.Lock()

    def _get(self) -> dict[str, dict[str, str]]:
        with self._lock:
            if self._models is None:
                self._models = {cap: client.served() or self._ask(cap) for cap, client in self._clients.items()}
            return self._models

    def __getitem__(self, cap: str) -> dict[str, str]:
        return self._get()[cap]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())
