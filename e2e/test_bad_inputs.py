"""Bad requests get the documented status, a field and reason to act on, no traceback, and the server stays up."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kinema.common.v1 import common_pb2
from kinema.orchestrator.v1 import orchestrator_pb2 as pb

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def detail(err: grpc.RpcError) -> common_pb2.ErrorDetail:
    for key, value in err.trailing_metadata() or ():
        if key == "kinema-error-bin":
            return common_pb2.ErrorDetail.FromString(value)
    return common_pb2.ErrorDetail()


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert "Traceback" not in (info.value.details() or "")
    return info.value


T2I = {"pipeline": "text_to_image", "prompts": ["a cube"], "steps": 2}


@pytest.mark.parametrize(
    ("change", "code", "field", "reason"),
    [
        ({"pipeline": "no_such_pipeline"}, NOT_FOUND, "pipeline", "PIPELINE_NOT_FOUND"),
        ({"steps": 1001}, INVALID, "steps", ""),
        ({"steps": -3}, INVALID, "steps", ""),
        ({"prompts": []}, INVALID, "prompts", ""),
        ({"guidance": -1.0}, INVALID, "guidance", ""),
        ({"strength": 0.5}, INVALID, "strength", ""),
        ({"sampler": "ddim-ish"}, INVALID, "sampler", ""),
        ({"width": 64, "height": 128}, INVALID, "width", ""),
        ({"prompts": ["a cube"] * 10_000}, INVALID, "prompts", "BATCH_TOO_LARGE"),
    ],
)
def test_bad_pipeline_requests(kinema, change, code, field, reason) -> None:
    for call in (lambda: kinema.generate(**(T2I | change)), lambda: kinema.submit(**(T2I | change))):
        err = refused(call)
        assert err.code() == code and detail(err).field == field, (err.code(), err.details())
        if reason:
            assert detail(err).reason == reason


def test_unknown_model_and_input_artifact_are_not_found(kinema) -> None:
    request = pb.PipelineRequest(**T2I)
    request.models["denoiser"].name = "denoiser_that_is_not_there"
    err = refused(lambda: list(kinema.call("Generate", pb.GenerateRequest(request=request))))
    assert (err.code(), detail(err).reason, detail(err).field) == (NOT_FOUND, "MODEL_NOT_FOUND", "models.denoiser")
    err = refused(lambda: kinema.generate(pipeline="image_to_image", prompts=["a cube"], inputs={"image": "ab" * 32}))
    assert (err.code(), detail(err).reason, detail(err).field) == (NOT_FOUND, "ARTIFACT_NOT_FOUND", "inputs.image")


def test_unknown_ids_and_malformed_hashes(kinema) -> None:
    for call in (lambda: kinema.get("0" * 32), lambda: kinema.cancel("0" * 32), lambda: kinema.artifact("ab" * 32)):
        assert refused(call).code() == NOT_FOUND
    for call in (lambda: kinema.artifact("not-a-hash"), lambda: kinema.artifact("ab" * 32, ttl=-1),
                 lambda: kinema.call("ListJobs", pb.ListJobsRequest(page_token="garbage"))):  # fmt: skip
        assert refused(call).code() == INVALID


def test_a_message_over_the_size_limit_is_resource_exhausted(kinema) -> None:
    err = refused(lambda: kinema.generate(prompts=["x" * (80 << 20)], steps=1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_server_is_still_serving(channel, kinema) -> None:
    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    assert kinema.generate(prompts=["a red cube"], steps=1)[-1].result.outputs
