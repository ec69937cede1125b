"""Autoencoder service: Encode / Decode over the vae_encoder and vae_decoder networks.

Model `vae` (the default) is served by the Triton models `vae_encoder` and `vae_decoder`;
a variant `vae_x` by `vae_x_encoder` and `vae_x_decoder`.
"""

from __future__ import annotations

import numpy as np
import torch

from kinema.autoencoder.v1 import autoencoder_pb2 as pb
from kinema.autoencoder.v1 import autoencoder_pb2_grpc as pb_grpc
from kinema.errors import InvalidInput
from kinema.rpc import tensors
from kinema.rpc.models import MAX_IMAGE_SIDE, ModelFamily, build_model_server
from kinema.rpc.server import KinemaServer
from kinema.rpc.settings import ServiceSettings

SERVICE = "kinema.autoencoder.v1.Autoencoder"
MAX_SIDE = MAX_IMAGE_SIDE  # latents too


class AutoencoderServicer(pb_grpc.AutoencoderServicer):
    def __init__(self, family: ModelFamily) -> None:
        self.family = family

    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        name, version = self.family.resolve(request.model)
        images = self.family.images(request.images)  # (B, 3, H, W)
        out = await self.family.call(context, f"{name}_encoder", version, {"IMAGE": images})
        latents = out["LATENT"]  # (B, C, h, w) posterior mean, normalised
        if request.sample:  # z = mean + std * eps, eps from the request's seed (CPU generator: reproducible)
            generator = torch.Generator().manual_seed(request.seed)
            eps = torch.randn(latents.shape, generator=generator).numpy()
            latents = latents + out["LATENT_STD"] * eps
        return pb.EncodeResponse(
            latents=tensors.encode(latents),
            model=await self.family.describe(f"{name}_encoder", version),
            downscale=images.shape[2] // latents.shape[2],
            latent_channels=latents.shape[1],
        )

    async def Decode(self, request: pb.DecodeRequest, context) -> pb.DecodeResponse:
        name, version = self.family.resolve(request.model)
        latents = tensors.decode(request.latents, "latents", np.float32, ndim=4)  # (B, C, h, w)
        self.family.check_batch(latents.shape[0], "latents")
        if min(latents.shape) == 0 or max(latents.shape[2:]) > MAX_SIDE:
            raise InvalidInput(f"latents: bad shape {tuple(latents.shape)}", reason="INVALID_SHAPE", field="latents")
        out = await self.family.call(context, f"{name}_decoder", version, {"LATENT": latents})
        return pb.DecodeResponse(
            images=tensors.encode(out["IMAGE"]), model=await self.family.describe(f"{name}_decoder", version)
        )

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        members = [f"{self.family.default}_encoder", f"{self.family.default}_decoder"]
        names = await self.family.list_models(request.model, members)
        return pb.ListModelsResponse(models=names, default_model=self.family.default)


def build_server(settings: ServiceSettings) -> KinemaServer:
    return build_model_server(
        settings,
        name="autoencoder",
        service=SERVICE,
        add_to_server=pb_grpc.add_AutoencoderServicer_to_server,
        servicer=AutoencoderServicer,
        default_model="vae",
    )
