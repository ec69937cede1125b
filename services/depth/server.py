"""Depth service: Estimate / ListModels over the `depth` network (Triton or in-process).

Model `depth` (the default) is the Triton model `depth`; a variant `depth_x` is the Triton model `depth_x`.
The network itself resizes each image to its working resolution and back, so maps match the input size.
"""

from __future__ import annotations

from kinema.depth.v1 import depth_pb2 as pb
from kinema.depth.v1 import depth_pb2_grpc as pb_grpc
from kinema.errors import InvalidInput
from kinema.rpc import tensors
from kinema.rpc.models import ModelFamily, build_model_server
from kinema.rpc.server import KinemaServer
from kinema.rpc.settings import ServiceSettings

SERVICE = "kinema.depth.v1.Depth"
# Every depth model Kinema trains predicts MiDaS-style relative inverse depth; a metric model would say so here.
KIND = pb.DEPTH_KIND_RELATIVE_INVERSE
# Longest image side over the shortest. The network scales the short side up to its working resolution, so the cost
# grows with the aspect ratio, not the pixel count: a 1x1024 image runs at 64x65536 (~2 GB and ~10 s of CPU each; a
# batch of 16 in a 200 KB request would need ~30 GB). 16:1 keeps the shipped model's working image within 64x1024.
MAX_ASPECT = 16


class DepthServicer(pb_grpc.DepthServicer):
    def __init__(self, family: ModelFamily) -> None:
        self.family = family

    async def Estimate(self, request: pb.EstimateRequest, context) -> pb.EstimateResponse:
        name, version = self.family.resolve(request.model)
        images = self.family.images(request.images)  # (B, 3, H, W)
        h, w = images.shape[2:]
        if max(h, w) > MAX_ASPECT * min(h, w):
            raise InvalidInput(f"images: {h}x{w} has an aspect ratio over {MAX_ASPECT}:1 (the network scales the short "
                               "side up to its working resolution); crop or tile such images", reason="INVALID_SHAPE",
                               field="images")  # fmt: skip
        out = await self.family.call(context, name, version, {"IMAGE": images})
        return pb.EstimateResponse(
            depth=tensors.encode(out["DEPTH"]),  # (B, 1, H, W)
            kind=KIND,
            model=await self.family.describe(name, version),
        )

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = await self.family.list_models(request.model)
        return pb.ListModelsResponse(models=models, default_model=self.family.default)


def build_server(settings: ServiceSettings) -> KinemaServer:
    return build_model_server(
        settings,
        name="depth",
        service=SERVICE,
        add_to_server=pb_grpc.add_DepthServicer_to_server,
        servicer=DepthServicer,
        default_model="depth",
    )
