"""The `Student` capability over gRPC: a client of the distill service (kinema.distill.v1).

The orchestrator binds it as a run's denoiser when the requested denoiser model is a student the distill service
lists (`kinema.orchestration.capabilities`); `text_to_image` then samples with the few-step sampler, as embedded
mode does with `kinema.pipelines.local.LocalStudent`. Channel, deadline, request id and error mapping are those of
every remote capability (`kinema.pipelines.remote`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import grpc
from torch import Tensor

from kinema.common.v1 import common_pb2
from kinema.distill.v1 import distill_pb2, distill_pb2_grpc
from kinema.errors import KinemaError
from kinema.nn.text import TextEmbedding
from kinema.pipelines.remote import _Client, _conditioning, _tensor, latent_channels_of, stream_result
from kinema.rpc import tensors
from kinema.sampling.samplers import Callback


class RemoteStudent(_Client):
    """`Student` over kinema.distill.v1: one streamed `Sample` call runs the whole few-step loop in the service.

    `default_steps` is the `student_steps` ListModels publishes; `latent_channels` its `in_channels` where the
    backend publishes the network's params, else `latent_channels` (an int, or a function giving it: the
    orchestrator passes the autoencoder's). Callbacks get `(i, n, None)` once per finished step. A callback that
    raises (a cancelled job) cancels the call, which stops the service's loop within one step, and the exception
    propagates.
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
    ) -> None:
        super().__init__(channel, model, version, timeout, request_id)
        self._stub = distill_pb2_grpc.DistillStub(channel)
        self._latent_channels = latent_channels

    def _info(self) -> common_pb2.ModelInfo:
        if "listed" not in self._facts:
            self._facts["listed"] = self._listed(self._stub.ListModels, distill_pb2.ListModelsRequest(model=self._ref))
        return self._facts["listed"]

    @property
    def default_steps(self) -> int:
        steps = json.loads(self._info().params_json or "{}").get("student_steps")
        if not steps:
            raise KinemaError(f"student {self._info().name!r} does not publish student_steps",
                              reason="STUDENT_STEPS_UNKNOWN")  # fmt: skip
        return int(steps)

    @property
    def latent_channels(self) -> int:
        if isinstance(self._latent_channels, int):
            return self._latent_channels
        if "latent_channels" not in self._facts:
            self._facts["latent_channels"] = latent_channels_of(self._info(), self._latent_channels)
        return self._facts["latent_channels"]

    def fingerprint(self) -> str:
        if "model" not in self._facts:
            self._seen(self._info())
        return self._facts["model"].sha256

    def sample_few(
        self,
        noise: Tensor,
        cond: TextEmbedding,
        callback: Callback | None,
        *,
        steps: int = 0,
        timesteps: Sequence[float] = (),
        seed: int = 0,
        seeds: Sequence[int] = (),
    ) -> Tensor:
        request = distill_pb2.SampleRequest(
            model=self._ref,
            noise=tensors.encode(noise),  # (B, C, h, w)
            cond=_conditioning(cond),
            steps=steps,
            timesteps=list(timesteps),
            seed=seed,
            seeds=list(seeds),
        )

        def on_progress(progress: common_pb2.Progress) -> None:
            if callback is not None:
                callback(progress.step - 1, progress.total, None)

        call = self._stub.Sample(request, timeout=self.timeout, metadata=self._metadata())
        result = stream_result(call, on_progress, "distill service")
        self._seen(result.model)
        return _tensor(result.latents, "result.latents")  # (B, C, h, w)
