"""TextEncoder service: validates prompts, calls the text_encoder network once per request batch."""

from __future__ import annotations

import numpy as np

from kinema.errors import InvalidInput
from kinema.pipelines.text_to_image import check_prompts
from kinema.rpc import tensors
from kinema.rpc.models import ModelFamily, build_model_server
from kinema.rpc.server import KinemaServer
from kinema.rpc.settings import ServiceSettings
from kinema.text_encoder.v1 import text_encoder_pb2 as pb
from kinema.text_encoder.v1 import text_encoder_pb2_grpc as pb_grpc

SERVICE = "kinema.text_encoder.v1.TextEncoder"


class TextEncoderServicer(pb_grpc.TextEncoderServicer):
    def __init__(self, family: ModelFamily) -> None:
        self.family = family

    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        name, version = self.family.resolve(request.model)
        prompts = list(request.prompts)
        if not prompts:
            raise InvalidInput("prompts: at least one prompt is required", reason="EMPTY", field="prompts")
        self.family.check_batch(len(prompts), "prompts")
        check_prompts(prompts, self.family.settings.max_prompt_chars)  # KINEMA_MAX_PROMPT_CHARS
        batch = np.array([[p.encode("utf-8")] for p in prompts], dtype=object)  # (B, 1)
        out = await self.family.call(context, name, version, {"PROMPT": batch})
        # Triton pads every prompt to max_length so requests batch together; trim to the longest
        # real prompt, as the embedded encoder pads, so both shapes give the same tensors.
        mask = out["MASK"]  # (B, L_max)
        length = int(mask.sum(1).max())
        return pb.EncodeResponse(
            tokens=tensors.encode(out["TOKENS"][:, :length]),
            mask=tensors.encode(mask[:, :length]),
            pooled=tensors.encode(out["POOLED"]),
            truncated=[bool(t) for t in out["TRUNCATED"][:, 0]],
            model=await self.family.describe(name, version),
            max_length=mask.shape[1],
        )

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = await self.family.list_models(request.model)
        return pb.ListModelsResponse(models=models, default_model=self.family.default)


def build_server(settings: ServiceSettings) -> KinemaServer:
    return build_model_server(
        settings,
        name="text_encoder",
        service=SERVICE,
        add_to_server=pb_grpc.add_TextEncoderServicer_to_server,
        servicer=TextEncoderServicer,
        default_model="text_encoder",
    )
