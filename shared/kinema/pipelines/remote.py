"""The capability protocols over gRPC: clients of the text_encoder, denoiser, autoencoder and depth services.

The orchestrator passes these to the same pipeline functions embedded mode passes `kinema.pipelines.local`
implementations to (ARCHITECTURE rule 2). They are synchronous (`grpc.Channel`): a pipeline runs in a worker
thread or a Celery task, never on an event loop. Every call carries the client's deadline (`timeout`) and
request id (`x-request-id`: the one given, else the request the calling thread serves, see
`kinema.rpc.logs.request_id`); a failed call raises the Kinema domain error the service raised
(`kinema.rpc.status.from_rpc_error`), never a `grpc.RpcError`.

Model facts (latent channels, downscale, fingerprints) come from the services and are cached per client:
`with_request_id` copies share the channel and that cache, so a job-scoped copy costs no extra calls.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any, Self

import grpc
import numpy as np
import torch
from torch import Tensor

from kinema.autoencoder.v1 import autoencoder_pb2, autoencoder_pb2_grpc
from kinema.common.v1 import common_pb2
from kinema.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from kinema.depth.v1 import depth_pb2, depth_pb2_grpc
from kinema.errors import KinemaError, NotFound
from kinema.inference.runner import RECONNECT_OPTIONS
from kinema.nn.text import TextEmbedding
from kinema.pipelines.protocols import SampleSpec, VideoSpec
from kinema.repository import autoencoder_fingerprint
from kinema.rpc import tensors
from kinema.rpc.logs import request_id as current_request_id
from kinema.rpc.status import from_rpc_error
from kinema.sampling.edit import start_latents
from kinema.sampling.samplers import Callback
from kinema.sampling.schedule import get_schedule
from kinema.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the services' default limit (ServiceSettings.max_message_bytes)
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *RECONNECT_OPTIONS,  # a restarted service is noticed within ~2 s, not gRPC's default of up to 120 s
)
REQUEST_ID_KEY = "x-request-id"  # read by kinema.rpc.server (REQUEST_ID_KEY), which clients need not import
PROBE_SIDE = 64  # pixels of the autoencoder's probe image: a multiple of every power-of-two downscale up to 64


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to `host:port` with Kinema's message size limits: plaintext, or TLS with `credentials`
    (`kinema.rpc.tls.internal_credentials`: the internal CA and this process's client certificate, for mTLS)."""
    if credentials is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def _tensor(t: common_pb2.Tensor, field: str, dtype: Any = np.float32) -> Tensor:
    return torch.from_numpy(tensors.decode(t, field, dtype, writable=True))


class _Client:
    """What every remote capability shares: channel, model selection, deadline, request id, error mapping."""

    def __init__(self, channel: grpc.Channel, model: str, version: str, timeout: float | None, request_id: str):
        self.channel = channel
        self.model, self.version = model, version
        self.timeout = timeout
        self.request_id = request_id
        self._ref = common_pb2.ModelRef(name=model, version=version)
        # Model facts, shared by `with_request_id` copies; each key is written once per value, so threads
        # sharing a client at most repeat a cheap call.
        self._facts: dict[str, Any] = {}

    def with_request_id(self, request_id: str) -> Self:
        """A copy that sends `request_id` (e.g. a job id), sharing this client's channel and cached facts."""
        clone = copy.copy(self)
        clone.request_id = request_id
        return clone

    def close(self) -> None:
        """Close the channel (shared with every `with_request_id` copy)."""
        self.channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        rid = self.request_id or current_request_id()
        return ((REQUEST_ID_KEY, rid),) if rid else ()

    def _unary(self, method: grpc.UnaryUnaryMultiCallable, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _seen(self, info: common_pb2.ModelInfo, key: str = "model") -> None:
        """Record the model a response says ran: fingerprints name what actually ran last."""
        self._facts[key] = info

    def served(self) -> dict[str, str] | None:
        """{"name", "version"} of the model that last answered this client, as its responses name it; None before
        any has (what a run's provenance names, `kinema.orchestration.capabilities`)."""
        info = self._facts.get("model")
        return None if info is None else {"name": info.name, "version": info.version}

    def _listed(self, method: grpc.UnaryUnaryMultiCallable, request: Any,
                default: str = "default_model") -> common_pb2.ModelInfo:  # fmt: skip
        """This client's model as ListModels describes it (the newest loaded version when none is pinned); no model
        named: the one the reply's field `default` names."""
        reply = self._unary(method, request)
        name = self.model or getattr(reply, default)
        infos = [m for m in reply.models if m.name == name and (not self.version or m.version == self.version)]
        if not infos:
            raise NotFound(
                f"model {name!r} version {self.version or '(newest)'} is not served here; ListModels shows what is",
                reason="MODEL_NOT_FOUND",
                field="model.name",
            )
        return max(infos, key=lambda m: int(m.version) if m.version.isdigit() else -1)


class RemoteTextEncoder(_Client):
    """`TextEncoder` over kinema.text_encoder.v1; the fingerprint is the served model's weights sha256."""

    def __init__(
        self,
        channel: grpc.Channel,
        model: str = "",
        version: str = "",
        timeout: float | None = 60.0,
        request_id: str = "",
    ) -> None:
        super().__init__(channel, model, version, timeout, request_id)
        self._stub = text_encoder_pb2_grpc.TextEncoderStub(channel)

    def encode(self, prompts: list[str]) -> TextEmbedding:
        r = self._unary(self._stub.Encode, text_encoder_pb2.EncodeRequest(model=self._ref, prompts=prompts))
        self._seen(r.model)
        return TextEmbedding(
            tokens=_tensor(r.tokens, "tokens"),  # (B, L, D)
            mask=_tensor(r.mask, "mask", np.bool_),  # (B, L)
            pooled=_tensor(r.pooled, "pooled"),  # (B, P)
            truncated=list(r.truncated),
        )

    def fingerprint(self) -> str:
        if "model" not in self._facts:
            self._seen(self._listed(self._stub.ListModels, text_encoder_pb2.ListModelsRequest(model=self._ref)))
        return self._facts["model"].sha256


def _conditioning(e: TextEmbedding) -> denoiser_pb2.Conditioning:
    return denoiser_pb2.Conditioning(
        tokens=tensors.encode(e.tokens), mask=tensors.encode(e.mask), pooled=tensors.encode(e.pooled)
    )


class RemoteDenoiser(_Client):
    """`Denoiser` over kinema.denoiser.v1: one streamed `Sample` call runs the whole loop in the service.

    `latent_channels`: an int, or a function giving it (`connect` passes the autoencoder's), used when
    ListModels' params_json does not carry `in_channels` (Triton-backed services leave params_json empty).

    Callbacks get `(i, n, x)` as in process: i = 0..n-1 once per finished step, n = steps - start_step. With
    `stream_latents=False` (the default: progress bars and job progress only count steps) x is None and no
    tensor travels per step. With `stream_latents=True` the service sends each step's predicted clean latents
    (`preview_every=1`) and x is the same x_t the in-process loop passes, rebuilt from them (equal up to
    float rounding). A callback that raises (a cancelled job) cancels the call, which stops the service's
    loop within one step, and the exception propagates.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        model: str = "",
        version: str = "",
        timeout: float | None = 600.0,
        request_id: str = "",
        *,
        latent_channels: int | Callable[[], int] | None = None,
        stream_latents: bool = False,
    ) -> None:
        super().__init__(channel, model, version, timeout, request_id)
        self._stub = denoiser_pb2_grpc.DenoiserStub(channel)
        self._latent_channels = latent_channels
        self.stream_latents = stream_latents

    @property
    def latent_channels(self) -> int:
        if isinstance(self._latent_channels, int):
            return self._latent_channels
        if "latent_channels" not in self._facts:
            info = self._listed(self._stub.ListModels, denoiser_pb2.ListModelsRequest(model=self._ref))
            self._facts["latent_channels"] = latent_channels_of(info, self._latent_channels)
        return self._facts["latent_channels"]

    def fingerprint(self) -> str:
        if "model" not in self._facts:
            self._seen(self._listed(self._stub.ListModels, denoiser_pb2.ListModelsRequest(model=self._ref)))
        return self._facts["model"].sha256

    def sample(
        self,
        noise: Tensor,
        cond: TextEmbedding,
        uncond: TextEmbedding,
        spec: SampleSpec,
        callback: Callback | None,
        *,
        init_latents: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        stream = self.stream_latents and callback is not None
        request = denoiser_pb2.SampleRequest(
            model=self._ref,
            noise=tensors.encode(noise),  # (B, C, h, w)
            cond=_conditioning(cond),
            uncond=_conditioning(uncond),
            steps=spec.steps,
            guidance=spec.guidance,
            sampler=spec.sampler,
            shift=spec.shift,
            preview_every=1 if stream else 0,
            start_step=spec.start_step,
        )
        if init_latents is not None:
            request.init_latents.CopyFrom(tensors.encode(init_latents))  # (B, C, h, w)
        if mask is not None:
            request.mask.CopyFrom(tensors.encode(mask))  # (B or 1, 1, h, w)
        schedule = get_schedule(spec.steps, spec.shift)[spec.start_step :] if stream else []
        # (B, C, h, w) x_t rebuilt from previews, in float64, from where the service starts; advanced by each preview
        state = {"x": start_latents(noise, schedule[0], init_latents).double() if stream else noise}

        def on_progress(progress: common_pb2.Progress) -> None:
            i = progress.step - 1
            step_x = None
            if stream and progress.HasField("preview"):
                # The service sends x0 = x_i - t_i v_i (denoiser.proto preview_every); so v_i = (x_i - x0) / t_i
                # and x_{i+1} = x_i + (t_{i+1} - t_i) v_i. t_i > 0 before the last step, and errors shrink by
                # t_{i+1} / t_i each step.
                t, t_next = schedule[i], schedule[i + 1]
                x0 = _tensor(progress.preview, "progress.preview").double()
                state["x"] = x_i = state["x"] + (t_next - t) * (state["x"] - x0) / t
                step_x = x_i.float()
            if callback is not None:
                callback(i, progress.total, step_x)

        call = self._stub.Sample(request, timeout=self.timeout, metadata=self._metadata())
        result = stream_result(call, on_progress, "denoiser")
        self._seen(result.model)
        return _tensor(result.latents, "result.latents")  # (B, C, h, w)


def latent_channels_of(info: common_pb2.ModelInfo, fallback: Callable[[], int] | None) -> int:
    """A denoiser's (or student's) latent channels: its published `in_channels`, else what `fallback` says."""
    channels = json.loads(info.params_json or "{}").get("in_channels")
    if channels is None and fallback is not None:
        channels = fallback()
    if channels is None:
        raise KinemaError(
            f"denoiser {info.name!r} does not publish its latent channels; pass latent_channels",
            reason="LATENT_CHANNELS_UNKNOWN",
        )
    return int(channels)


def _events(call: Any) -> Any:
    """The stream's events; a failed call raises its domain error (a callback's own errors pass untouched)."""
    try:
        yield from call
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


def stream_result(call: Any, on_progress: Callable[[common_pb2.Progress], None], service: str,
                  rpc: str = "Sample") -> Any:  # fmt: skip
    """The result event of a streamed sampling call (the denoiser's Sample or SampleVideo, distill's Sample),
    `on_progress` called for each progress event before it. A failed call raises its domain error; anything
    `on_progress` raises (a cancelled job) cancels the call, which stops the service's loop within one step, and
    propagates."""
    result = None
    try:
        for event in _events(call):
            if event.HasField("result"):
                result = event.result
            else:
                on_progress(event.progress)
    except BaseException:
        call.cancel()  # a no-op once the call ended; otherwise the service stops its loop at the next step
        raise
    if result is None:
        raise KinemaError(f"the {service}'s {rpc} stream ended without a result", reason="NO_RESULT")
    return result


class RemoteVideoDenoiser(_Client):
    """`VideoDenoiser` over kinema.denoiser.v1: one streamed `SampleVideo` call samples a whole clip in the service.

    `latent_channels` and `max_frames` are the `in_channels` and `max_frames` the video model publishes in
    ListModels' params_json (asked once, cached); no model named: the service's `default_video_model`. Callbacks
    get `(i, n, None)` once per finished step (no latents travel per step). A callback that raises (a cancelled
    job) cancels the call, which stops the service's loop within one step, and the exception propagates.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        model: str = "",
        version: str = "",
        timeout: float | None = 600.0,
        request_id: str = "",
    ) -> None:
        super().__init__(channel, model, version, timeout, request_id)
        self._stub = denoiser_pb2_grpc.DenoiserStub(channel)

    def _info(self) -> common_pb2.ModelInfo:
        if "listed" not in self._facts:
            request = denoiser_pb2.ListModelsRequest(model=self._ref)
            self._facts["listed"] = self._listed(self._stub.ListModels, request, "default_video_model")
        return self._facts["listed"]

    def _param(self, key: str) -> int:
        info = self._info()
        value = json.loads(info.params_json or "{}").get(key)
        if value is None:
            raise KinemaError(f"video denoiser {info.name!r} does not publish {key} in its params_json",
                              reason="VIDEO_PARAMS_UNKNOWN")  # fmt: skip
        return int(value)

    @property
    def latent_channels(self) -> int:
        return self._param("in_channels")

    @property
    def max_frames(self) -> int:
        return self._param("max_frames")

    def fingerprint(self) -> str:
        if "model" not in self._facts:
            self._seen(self._info())
        return self._facts["model"].sha256

    def sample_clip(
        self,
        noise: Tensor,
        content: TextEmbedding | Tensor,
        uncond: TextEmbedding,
        structure: Tensor,
        spec: VideoSpec,
        callback: Callback | None,
        *,
        init_latents: Tensor | None = None,
        window: int = 0,
        overlap: int = 0,
    ) -> Tensor:
        request = denoiser_pb2.SampleVideoRequest(
            model=self._ref,
            noise=tensors.encode(noise),  # (1, F, C, h, w)
            uncond=_conditioning(uncond),
            steps=spec.steps,
            guidance=spec.guidance,
            temporal_guidance=spec.temporal_guidance,
            structure=tensors.encode(structure),  # (1, F, 1, h, w)
            structure_level=spec.structure_level,
            shift=spec.shift,
            start_step=spec.start_step,
            window=window,
            overlap=overlap,
        )
        if isinstance(content, TextEmbedding):
            request.cond.CopyFrom(_conditioning(content))
        else:
            request.reference_latent.CopyFrom(tensors.encode(content))  # (1, C, h, w)
        if init_latents is not None:
            request.init_latents.CopyFrom(tensors.encode(init_latents))  # (1, F, C, h, w)

        def on_progress(progress: common_pb2.Progress) -> None:
            if callback is not None:
                callback(progress.step - 1, progress.total, None)

        call = self._stub.SampleVideo(request, timeout=self.timeout, metadata=self._metadata())
        result = stream_result(call, on_progress, "denoiser", "SampleVideo")
        self._seen(result.model)
        return _tensor(result.latents, "result.latents")  # (1, F, C, h, w)


class RemoteDepth(_Client):
    """`DepthEstimator` over kinema.depth.v1 (relative inverse depth, as `LocalDepth`).

    A batch is sent in calls of at most `batch` images (the service's KINEMA_MAX_BATCH, 16 by default) and at most
    `max_bytes` of pixels each, so a pipeline may pass a whole window of frames.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        model: str = "",
        version: str = "",
        timeout: float | None = 60.0,
        request_id: str = "",
        *,
        batch: int = 16,
        max_bytes: int = MAX_MESSAGE_BYTES // 2,
    ) -> None:
        super().__init__(channel, model, version, timeout, request_id)
        self._stub = depth_pb2_grpc.DepthStub(channel)
        self.batch, self.max_bytes = batch, max_bytes

    def estimate(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> relative inverse depth (B, 1, H, W), larger = nearer."""
        per_call = max(1, min(self.batch, self.max_bytes // max(1, images[:1].numel() * 4)))
        maps = []
        for chunk in images.split(per_call):
            request = depth_pb2.EstimateRequest(model=self._ref, images=tensors.encode(chunk))  # (b, 3, H, W)
            r = self._unary(self._stub.Estimate, request)
            if r.kind != depth_pb2.DEPTH_KIND_RELATIVE_INVERSE:
                raise KinemaError(f"depth model {r.model.name!r} gives {depth_pb2.DepthKind.Name(r.kind)}, not the "
                                  "relative inverse depth a DepthEstimator returns", reason="DEPTH_KIND")  # fmt: skip
            self._seen(r.model)
            maps.append(_tensor(r.depth, "depth"))  # (b, 1, H, W)
        return torch.cat(maps)  # (B, 1, H, W)

    def fingerprint(self) -> str:
        if "model" not in self._facts:
            self._seen(self._listed(self._stub.ListModels, depth_pb2.ListModelsRequest(model=self._ref)))
        return self._facts["model"].sha256


class RemoteAutoencoder(_Client):
    """`Autoencoder` over kinema.autoencoder.v1 (latents on the wire are normalised, as in process).

    `downscale` and `latent_channels` come from one Encode of a zero 64x64 image on first use (cached):
    exact for any backend and variant, where ListModels' params_json is empty under Triton.

    `fingerprint()` is the embedded autoencoder's (`kinema.repository.load_autoencoder`): sha256 over the
    hex sha256 of the encoder's weights followed by the decoder's, so provenance compares across both
    shapes. The two hashes are those of the encoder and decoder that last ran (a probe call when one has not).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        model: str = "",
        version: str = "",
        timeout: float | None = 60.0,
        request_id: str = "",
    ) -> None:
        super().__init__(channel, model, version, timeout, request_id)
        self._stub = autoencoder_pb2_grpc.AutoencoderStub(channel)

    @property
    def downscale(self) -> int:
        return self._shape_facts()[0]

    @property
    def latent_channels(self) -> int:
        return self._shape_facts()[1]

    def _shape_facts(self) -> tuple[int, int]:
        if "shape" not in self._facts:
            self._probe()
        return self._facts["shape"]

    def _probe(self) -> None:
        self.encode(torch.zeros(1, 3, PROBE_SIDE, PROBE_SIDE))  # (1, 3, 64, 64)

    def encode(self, images: Tensor) -> Tensor:
        """Posterior mean (deterministic), as `LocalAutoencoder.encode`."""
        request = autoencoder_pb2.EncodeRequest(model=self._ref, images=tensors.encode(images))
        r = self._unary(self._stub.Encode, request)
        self._seen(r.model, "encoder")
        self._facts["shape"] = (r.downscale, r.latent_channels)
        return _tensor(r.latents, "latents")  # (B, C, H/f, W/f)

    def decode(self, latents: Tensor) -> Tensor:
        request = autoencoder_pb2.DecodeRequest(model=self._ref, latents=tensors.encode(latents))
        r = self._unary(self._stub.Decode, request)
        self._seen(r.model, "decoder")
        return _tensor(r.images, "images")  # (B, 3, H, W), not clamped

    def fingerprint(self) -> str:
        if "encoder" not in self._facts:
            self._probe()
        if "decoder" not in self._facts:
            f, c = self._shape_facts()
            self.decode(torch.zeros(1, c, PROBE_SIDE // f, PROBE_SIDE // f))
        encoder, decoder = self._facts["encoder"].sha256, self._facts["decoder"].sha256
        if not (encoder and decoder):
            return ""  # a backend that does not know its weights' hashes
        return autoencoder_fingerprint(encoder, decoder)  # the embedded formula, so both shapes agree

    def served(self) -> dict[str, str] | None:
        """{"name", "version"} of the autoencoder that last answered: the service's model `vae` is its networks
        `vae_encoder` and `vae_decoder` (a variant `vae_x`: `vae_x_encoder`, `vae_x_decoder`), so the network's
        name less its suffix. The decoder's where both answered: every image pipeline ends with a Decode, while the
        encoder of a text-to-image client may have answered only its first run's probe."""
        info = self._facts.get("decoder") or self._facts.get("encoder")
        if info is None:
            return None
        return {"name": info.name.removesuffix("_encoder").removesuffix("_decoder"), "version": info.version}


def connect(
    text_encoder: str,
    denoiser: str,
    autoencoder: str,
    *,
    request_id: str = "",
    timeout: float | None = None,
    stream_latents: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
) -> tuple[RemoteTextEncoder, RemoteDenoiser, RemoteAutoencoder]:
    """(text encoder, denoiser, autoencoder) clients of the services at these `host:port` addresses, ready for
    `text_to_image`; each owns its channel (`close()`). The denoiser's latent channels default to the
    autoencoder's, the space it works in. `timeout` (seconds per call) overrides every client's default;
    `credentials` makes the channels TLS (`open_channel`).
    """
    deadline = {} if timeout is None else {"timeout": timeout}
    te = RemoteTextEncoder(open_channel(text_encoder, credentials), request_id=request_id, **deadline)
    ae = RemoteAutoencoder(open_channel(autoencoder, credentials), request_id=request_id, **deadline)
    dn = RemoteDenoiser(open_channel(denoiser, credentials), request_id=request_id,
                        latent_channels=lambda: ae.latent_channels, stream_latents=stream_latents,
                        **deadline)  # fmt: skip
    return te, dn, ae


def connect_video(
    text_encoder: str,
    depth: str,
    denoiser: str,
    autoencoder: str,
    *,
    request_id: str = "",
    timeout: float | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> tuple[RemoteTextEncoder, RemoteDepth, RemoteVideoDenoiser, RemoteAutoencoder]:
    """(text encoder, depth estimator, video denoiser, autoencoder) clients of the services at these `host:port`
    addresses, ready for `edit_video` (as `kinema.pipelines.local.load_local_video` in process); the video denoiser is
    the denoiser service's default video model. Each owns its channel (`close()`); `timeout` (seconds per call)
    overrides every client's default; `credentials` makes the channels TLS (`open_channel`)."""
    deadline = {} if timeout is None else {"timeout": timeout}
    return (
        RemoteTextEncoder(open_channel(text_encoder, credentials), request_id=request_id, **deadline),
        RemoteDepth(open_channel(depth, credentials), request_id=request_id, **deadline),
        RemoteVideoDenoiser(open_channel(denoiser, credentials), request_id=request_id, **deadline),
        RemoteAutoencoder(open_channel(autoencoder, credentials), request_id=request_id, **deadline),
    )
