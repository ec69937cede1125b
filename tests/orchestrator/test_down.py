"""The orchestrator with its model services down: UNAVAILABLE for runs, unavailable capabilities in ListModels,
nothing stored; the checks that need no service also answer here."""

from __future__ import annotations

import grpc
import pytest

from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.rpc.status import parse_error_detail

from .conftest import stub_of


@pytest.fixture(scope="module")
def stub(lonely_orchestrator):
    channel, stub = stub_of(lonely_orchestrator)
    yield stub
    channel.close()


def _generate(stub, request: pb.PipelineRequest, **kw):
    return list(stub.Generate(pb.GenerateRequest(request=request, **kw), timeout=30))


def test_services_down_is_unavailable_and_stores_nothing(stub, lonely_orchestrator) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _generate(stub, pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"], steps=2))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "Traceback" not in info.value.details()
    assert not any(p.is_file() for p in lonely_orchestrator.artifacts.rglob("*"))


def test_list_models_reports_down_services_as_unavailable(stub) -> None:
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert [c.capability for c in reply.capabilities] == ["autoencoder", "denoiser", "text_encoder", "video_denoiser"]
    assert not any(c.available or c.models or c.default_model for c in reply.capabilities)
    assert stub.ListModels(pb.ListModelsRequest(capability="depth"), timeout=30).capabilities == []


def test_list_pipelines(stub) -> None:
    infos = stub.ListPipelines(pb.ListPipelinesRequest(), timeout=10).pipelines
    assert [i.name for i in infos] == ["edit_video", "image_to_image", "inpaint", "text_to_image"]
    (info,) = stub.ListPipelines(pb.ListPipelinesRequest(name="text_to_image"), timeout=10).pipelines
    assert info.name == "text_to_image" and info.output_media_type == "image/png"
    assert sorted(info.capabilities) == ["autoencoder", "denoiser", "text_encoder"]
    params = {p.name: p for p in info.parameters}
    assert params["prompts"].required and params["steps"].default_value.number_value == 28
    assert params["guidance"].default_value.number_value == 4.0 and params["width"].default_value.number_value == 64
    assert not params["seed"].HasField("default_value")
    assert stub.ListPipelines(pb.ListPipelinesRequest(name="video"), timeout=10).pipelines == []


T2I = {"pipeline": "text_to_image", "prompts": ["a cube"], "steps": 2}


@pytest.mark.parametrize(
    ("change", "code", "field", "reason"),
    [
        ({"pipeline": "video"}, grpc.StatusCode.NOT_FOUND, "pipeline", "PIPELINE_NOT_FOUND"),
        ({"pipeline": ""}, grpc.StatusCode.INVALID_ARGUMENT, "pipeline", "MISSING"),
        ({"prompts": []}, grpc.StatusCode.INVALID_ARGUMENT, "prompts", "MISSING"),
        ({"prompts": ["a"] * 17}, grpc.StatusCode.INVALID_ARGUMENT, "prompts", "BATCH_TOO_LARGE"),
        ({"steps": 1001}, grpc.StatusCode.INVALID_ARGUMENT, "steps", "OUT_OF_RANGE"),
        ({"steps": -1}, grpc.StatusCode.INVALID_ARGUMENT, "steps", "OUT_OF_RANGE"),
        ({"guidance": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "guidance", "OUT_OF_RANGE"),
        ({"width": 64, "height": 128}, grpc.StatusCode.INVALID_ARGUMENT, "width", "NOT_SQUARE"),
        ({"width": 512, "height": 512}, grpc.StatusCode.INVALID_ARGUMENT, "width", "OUT_OF_RANGE"),
        ({"sampler": "ddim"}, grpc.StatusCode.INVALID_ARGUMENT, "sampler", "OUT_OF_RANGE"),
        ({"shift": -2.0}, grpc.StatusCode.INVALID_ARGUMENT, "shift", "OUT_OF_RANGE"),
        ({"seed": 2**63}, grpc.StatusCode.INVALID_ARGUMENT, "seed", "OUT_OF_RANGE"),
        ({"strength": 0.5}, grpc.StatusCode.INVALID_ARGUMENT, "strength", "UNUSED_FIELD"),
        (
            {"models": {"depth": {"name": "depth"}}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "models.depth",
            "UNUSED_CAPABILITY",
        ),
    ],
)
def test_bad_requests_fail_before_any_service_call(stub, change, code, field, reason) -> None:
    from google.protobuf import json_format

    request = json_format.ParseDict(T2I | change, pb.PipelineRequest())
    with pytest.raises(grpc.RpcError) as info:
        _generate(stub, request)
    err = info.value
    detail = parse_error_detail(err.trailing_metadata())
    assert (err.code(), detail.field, detail.reason) == (code, field, reason), err.details()
    if field == "pipeline" and code == grpc.StatusCode.NOT_FOUND:
        assert "text_to_image" in err.details()


def test_inputs_are_rejected_by_text_to_image(stub) -> None:
    request = pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"])
    request.inputs["image"].sha256 = "0" * 64
    with pytest.raises(grpc.RpcError) as info:
        _generate(stub, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert parse_error_detail(info.value.trailing_metadata()).field == "inputs"


def test_edit_video_without_a_depth_service_is_a_failed_precondition(stub, lonely_orchestrator) -> None:
    request = pb.PipelineRequest(pipeline="edit_video", prompts=["a red cube"], steps=1)
    request.inputs["video"].sha256 = "0" * 64  # refused for the missing service before the input is looked up
    with pytest.raises(grpc.RpcError) as info:
        _generate(stub, request)
    detail = parse_error_detail(info.value.trailing_metadata())
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and detail.reason == "CAPABILITY_NOT_CONFIGURED"
    assert "KINEMA_DEPTH_URL" in info.value.details() and detail.metadata["capability"] == "depth"
    assert not any(p.is_file() for p in lonely_orchestrator.artifacts.rglob("*"))


def test_artifact_lookups(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.GetArtifact(pb.GetArtifactRequest(sha256="ab" * 32), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    for bad in (pb.GetArtifactRequest(sha256="AB" * 32), pb.GetArtifactRequest(sha256="ab" * 32, url_ttl_seconds=-1)):
        with pytest.raises(grpc.RpcError) as info:
            stub.GetArtifact(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.GetArtifact(pb.GetArtifactRequest(sha256="ab" * 32), timeout=10, metadata=(("kinema-tenant", "../x"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_jobs_are_off_without_redis(stub) -> None:
    calls = [
        lambda: stub.SubmitJob(pb.SubmitJobRequest(request=pb.PipelineRequest(**T2I)), timeout=10),
        lambda: stub.GetJob(pb.GetJobRequest(id="x"), timeout=10),
        lambda: list(stub.WatchJob(pb.WatchJobRequest(id="x"), timeout=10)),
        lambda: stub.CancelJob(pb.CancelJobRequest(id="x"), timeout=10),
        lambda: stub.ListJobs(pb.ListJobsRequest(), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "set KINEMA_REDIS_URL" in info.value.details()


def test_previews_are_unimplemented(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _generate(stub, pb.PipelineRequest(**T2I), preview_every=1)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "not implemented yet" in info.value.details()
