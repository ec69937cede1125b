"""The model services as capabilities: long-lived channels, per-model clients (cached, so model facts are asked
once) and the services' ListModels, for the orchestrator to bind a pipeline run to."""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from kinema.autoencoder.v1 import autoencoder_pb2, autoencoder_pb2_grpc
from kinema.common.v1 import common_pb2
from kinema.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from kinema.errors import NotFound
from kinema.orchestration.inputs import NO_INPUTS, StoredInputs
from kinema.pipelines.remote import RemoteAutoencoder, RemoteDenoiser, RemoteTextEncoder, open_channel
from kinema.rpc.logs import request_id as current_request_id
from kinema.rpc.status import from_rpc_error
from kinema.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc

CAPABILITIES = ("autoencoder", "denoiser", "text_encoder")  # sorted, as ListModels answers them

_LIST_MODELS: dict[str, tuple[Any, Any]] = {
    "text_encoder": (text_encoder_pb2_grpc.TextEncoderStub, text_encoder_pb2.ListModelsRequest),
    "denoiser": (denoiser_pb2_grpc.DenoiserStub, denoiser_pb2.ListModelsRequest),
    "autoencoder": (autoencoder_pb2_grpc.AutoencoderStub, autoencoder_pb2.ListModelsRequest),
}


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

    def __init__(self, addresses: Mapping[str, str]) -> None:
        self.channels = {cap: open_channel(addresses[cap]) for cap in CAPABILITIES}
        self._clients: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def catalog(self, capability: str, timeout: float, ref: common_pb2.ModelRef | None = None) -> Catalog:
        """The service's ListModels (filtered by `ref`); a failed call raises its domain error (e.g. Unavailable)."""
        stub_type, request_type = _LIST_MODELS[capability]
        stub = stub_type(self.channels[capability])
        rid = current_request_id()
        try:
            reply = stub.ListModels(request_type(model=ref or common_pb2.ModelRef()), timeout=timeout,
                                    metadata=(("x-request-id", rid),) if rid else ())  # fmt: skip
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return Catalog(list(reply.models), reply.default_model)

    def _client(self, capability: str, ref: common_pb2.ModelRef, ae: RemoteAutoencoder | None = None) -> Any:
        key = (capability, ref.name, ref.version) + ((ae.model, ae.version) if ae is not None else ())
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                channel = self.channels[capability]
                if capability == "text_encoder":
                    client = RemoteTextEncoder(channel, ref.name, ref.version)
                elif capability == "autoencoder":
                    client = RemoteAutoencoder(channel, ref.name, ref.version)
                else:  # the denoiser works in the autoencoder's latent space
                    assert ae is not None
                    client = RemoteDenoiser(channel, ref.name, ref.version, latent_channels=lambda: ae.latent_channels)
                self._clients[key] = client
        return client

    def bind(
        self, capabilities: tuple[str, ...], overrides: Mapping[str, common_pb2.ModelRef], timeout: float
    ) -> Bound:
        """Clients for `capabilities`, each bounded by `timeout` seconds per call, and the models they resolve to.

        A model left out resolves to the service's default; a version left out to the newest it lists. The
        request id travels from the calling thread's request (`kinema.rpc.logs`).
        """
        empty = common_pb2.ModelRef()
        refs = {cap: overrides.get(cap, empty) for cap in capabilities}
        ae = self._client("autoencoder", refs["autoencoder"]) if "autoencoder" in refs else None
        clients: dict[str, Any] = {}
        models: dict[str, dict[str, str]] = {}
        for cap in capabilities:
            client = ae if cap == "autoencoder" else self._client(cap, refs[cap], ae)
            scoped = copy.copy(client)  # shares channel and cached model facts; own deadline
            scoped.timeout = timeout
            clients[cap] = scoped
            catalog = self.catalog(cap, timeout, refs[cap])
            name = refs[cap].name or catalog.default_model
            if (refs[cap].name or refs[cap].version) and not catalog.models:  # the service filtered by the override
                raise NotFound(
                    f"the {cap} service serves no model {name!r} version {refs[cap].version or '(newest)'}; "
                    "ListModels shows what it serves",
                    reason="MODEL_NOT_FOUND",
                    field=f"models.{cap}",
                )
            # The autoencoder service lists model `vae` as its two networks, `vae_encoder` and `vae_decoder`.
            listed = {name, f"{name}_encoder"} if cap == "autoencoder" else {name}
            versions = [m.version for m in catalog.models if m.name in listed and m.version.isdigit()]
            version = refs[cap].version or (max(versions, key=int) if versions else "")
            models[cap] = {"name": name, "version": version}
        return Bound(clients, models)
