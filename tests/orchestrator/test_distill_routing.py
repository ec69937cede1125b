"""The orchestrator with a distill service (KINEMA_DISTILL_URL): a text_to_image run whose models.denoiser names a
student samples it with the few-step sampler through the distill service, with the student's own defaults, and the
stored PNGs are the embedded `kinema generate --denoiser` images. Real processes: Triton (the student among the
served models), the model services, the distill service and two orchestrators (one whose distill service is down)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from kinema.cli import main as kinema_main
from kinema.nn.checkpoint import sha256_file
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.repository import default_models_dir
from kinema.rpc.process import free_port
from kinema.rpc.status import parse_error_detail

from .conftest import start_orchestrator, stub_of

pytestmark = pytest.mark.slow

PROMPT = "a small red sphere to the left of a blue cube"
STUDENT = "denoiser_4step"
STUDENT_SHA = sha256_file(default_models_dir() / STUDENT / "1/mmdit.safetensors")


@pytest.fixture(scope="module")
def stub(services, distill, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-orchestrator")
    addresses = {name: s.address for name, s in services.items()} | {"distill": distill.address}
    proc = start_orchestrator(root, root / "artifacts", addresses)
    channel, stub = stub_of(proc)
    try:
        yield stub
    finally:
        channel.close()
        proc.stop()


def _pixels(url: str) -> np.ndarray:
    data = Path(url2pathname(urlsplit(url).path)).read_bytes()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _request(**fields) -> pb.PipelineRequest:
    request = pb.PipelineRequest(pipeline="text_to_image", **({"prompts": [PROMPT, PROMPT], "seed": 5} | fields))
    request.models["denoiser"].name = STUDENT
    return request


def _code(stub, request) -> tuple[grpc.StatusCode, str, grpc.RpcError]:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(request=request), timeout=120))
    return info.value.code(), info.value.details(), info.value


def test_a_student_runs_its_few_steps_and_matches_embedded_kinema_generate(stub, tmp_path):
    events = list(stub.Generate(pb.GenerateRequest(request=_request()), timeout=120))
    progress = [(e.progress.step, e.progress.total) for e in events if e.HasField("progress")]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]  # the student's own 4 steps, steps left unset
    outputs = events[-1].result.outputs
    p = outputs[0].provenance
    assert (p.models["denoiser"].name, p.models["denoiser"].version, p.models["denoiser"].sha256) == (
        STUDENT, "1", STUDENT_SHA)  # fmt: skip
    params = json_format.MessageToDict(p.parameters)
    assert (params["steps"], params["guidance"]) == (4, 1)  # the resolved request: the student's defaults

    out = tmp_path / "want.png"
    argv = ["generate", PROMPT, "-o", str(out), "--n", "2", "--seed", "5", "--denoiser", STUDENT, "-q"]
    assert kinema_main(argv) == 0
    for o, want in zip(outputs, (tmp_path / "want-0.png", tmp_path / "want-1.png"), strict=True):
        embedded = np.asarray(Image.open(want).convert("RGB")).astype(int)
        assert np.abs(_pixels(o.artifact.uri) - embedded).max() <= 1
        assert json.loads(Image.open(want).text["parameters"])["steps"] == 4

    # Output 1's provenance is the request of that image alone, and reproduces it alone (its own re-noising stream).
    again = json_format.ParseDict(json_format.MessageToDict(outputs[1].provenance.parameters), pb.PipelineRequest())
    assert again.models["denoiser"].name == STUDENT and again.seed == 6
    alone = list(stub.Generate(pb.GenerateRequest(request=again), timeout=120))[-1].result.outputs[0]
    assert np.abs(_pixels(alone.artifact.uri) - _pixels(outputs[1].artifact.uri)).max() <= 1


def test_a_teacher_run_is_unchanged_beside_it(stub):
    request = pb.PipelineRequest(pipeline="text_to_image", prompts=[PROMPT], seed=5, steps=2)
    events = list(stub.Generate(pb.GenerateRequest(request=request), timeout=120))
    assert [e.progress.total for e in events if e.HasField("progress")] == [2, 2]
    p = events[-1].result.outputs[0].provenance
    assert p.models["denoiser"].name == "denoiser" and json_format.MessageToDict(p.parameters)["guidance"] == 4


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"guidance": 4.0}, "guidance"), ({"steps": 28}, "steps"), ({"steps": 3}, "steps"), ({"sampler": "heun"},
     "sampler")],
)  # fmt: skip
def test_what_a_student_cannot_do_is_invalid_argument_naming_the_field(stub, fields, field):
    code, details, err = _code(stub, _request(**fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    detail = parse_error_detail(err.trailing_metadata())
    assert detail is not None and detail.field == field, details


def test_an_unknown_denoiser_is_not_found(stub):
    request = _request()
    request.models["denoiser"].name = "denoiser_none"
    code, details, err = _code(stub, request)
    assert code == grpc.StatusCode.NOT_FOUND and "denoiser_none" in details
    assert parse_error_detail(err.trailing_metadata()).field == "models.denoiser"


def test_list_models_shows_the_students_among_the_denoisers(stub):
    reply = stub.ListModels(pb.ListModelsRequest(capability="denoiser"), timeout=30)
    (denoiser,) = reply.capabilities
    assert denoiser.available and denoiser.default_model == "denoiser"
    listed = {m.name: m for m in denoiser.models}
    assert {"denoiser", STUDENT} <= set(listed)
    assert json.loads(listed[STUDENT].params_json)["student_steps"] == 4


def test_with_the_distill_service_down_only_named_denoisers_wait_for_it(services, tmp_path):
    addresses = {name: s.address for name, s in services.items()} | {"distill": f"127.0.0.1:{free_port()}"}
    proc = start_orchestrator(tmp_path, tmp_path / "artifacts", addresses)
    channel, stub = stub_of(proc)
    try:
        code, details, _ = _code(stub, _request())
        assert code == grpc.StatusCode.UNAVAILABLE and "distill" in details
        ok = pb.PipelineRequest(pipeline="text_to_image", prompts=[PROMPT], seed=1, steps=1)
        assert list(stub.Generate(pb.GenerateRequest(request=ok), timeout=120))[-1].HasField("result")
        (denoiser,) = stub.ListModels(pb.ListModelsRequest(capability="denoiser"), timeout=30).capabilities
        assert denoiser.available and "denoiser" in [m.name for m in denoiser.models]  # the teacher still listed
    finally:
        channel.close()
        proc.stop()
