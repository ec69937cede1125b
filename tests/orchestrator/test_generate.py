"""Generate over real processes (Triton, the three model services, the orchestrator): the stored PNGs are the
embedded `kinema generate` images, provenance round trips and reproduces them, and a cancel stops the work."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from kinema.cli import main as kinema_main
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.pipelines.local import load_local
from kinema.rpc.status import parse_error_detail

from .conftest import model_calls, stub_of

pytestmark = pytest.mark.slow

PROMPT = "a small red sphere to the left of a blue cube"
STEPS = 6


@pytest.fixture(scope="module")
def stub(orchestrator):
    channel, stub = stub_of(orchestrator)
    yield stub
    channel.close()


def _read_url(url: str) -> bytes:
    parts = urlsplit(url)
    assert parts.scheme == "file", url
    return Path(url2pathname(parts.path)).read_bytes()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def generated(stub):
    request = pb.PipelineRequest(pipeline="text_to_image", prompts=[PROMPT, PROMPT], seed=3, steps=STEPS, guidance=4.0)
    events = list(stub.Generate(pb.GenerateRequest(request=request), timeout=120))
    return request, events


def test_progress_then_one_result(generated) -> None:
    _, events = generated
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [(p.step, p.total) for p in progress] == [(s, STEPS) for s in range(1, STEPS + 1)]
    assert all(e.HasField("progress") for e in events[:-1]) and events[-1].HasField("result")


def test_stored_pngs_equal_the_embedded_kinema_generate(generated, tmp_path) -> None:
    _, events = generated
    outputs = events[-1].result.outputs
    assert [(o.index, o.seed) for o in outputs] == [(0, 3), (1, 4)]
    out = tmp_path / "want.png"
    argv = [
        "generate",
        PROMPT,
        "-o",
        str(out),
        "--n",
        "2",
        "--seed",
        "3",
        "--steps",
        str(STEPS),
        "--guidance",
        "4",
        "-q",
    ]
    assert kinema_main(argv) == 0
    for o, want in zip(outputs, (tmp_path / "want-0.png", tmp_path / "want-1.png"), strict=True):
        data = _read_url(o.artifact.uri)
        assert hashlib.sha256(data).hexdigest() == o.artifact.sha256 and len(data) == o.artifact.size_bytes
        assert o.artifact.media_type == "image/png" and not o.prompt_truncated
        got = _pixels(data)
        assert got.shape == (64, 64, 3) and np.abs(got - _pixels(want.read_bytes())).max() <= 1
        assert _read_url(o.presigned_url) == data
        assert o.expires_at.ToSeconds() > time.time() + 3500


def test_provenance_round_trips_and_reproduces(generated, stub) -> None:
    _, events = generated
    caps = ("text_encoder", "denoiser", "autoencoder")
    local_models = {cap: m.fingerprint() for cap, m in zip(caps, load_local(), strict=True)}
    first = events[-1].result.outputs[0]
    p = first.provenance
    assert p.pipeline == "text_to_image" and p.seed == 3 and not p.parent_sha256
    assert {cap: m.sha256 for cap, m in p.models.items()} == local_models
    assert p.models["denoiser"].name == "denoiser" and p.created_at.seconds > 0
    # A run of the defaults resolves their versions (the newest each service lists) while it runs.
    assert {cap: m.version for cap, m in p.models.items()} == dict.fromkeys(caps, "1")

    # GetArtifact answers the same provenance and a fresh URL to the same bytes, for the caller's tenant only.
    got = stub.GetArtifact(pb.GetArtifactRequest(sha256=first.artifact.sha256, url_ttl_seconds=60), timeout=10)
    assert got.provenance == p and got.artifact == first.artifact
    assert _read_url(got.presigned_url) == _read_url(first.artifact.uri)
    assert 0 < got.expires_at.ToSeconds() - time.time() <= 61
    with pytest.raises(grpc.RpcError) as info:
        stub.GetArtifact(pb.GetArtifactRequest(sha256=first.artifact.sha256), timeout=10,
                         metadata=(("kinema-tenant", "acme"),))  # fmt: skip
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    # The parameters are the resolved request of this output alone: it reproduces the image (a batch of one here,
    # of two first: float rounding may differ by a level, as the proto allows off CPU).
    again = json_format.ParseDict(json_format.MessageToDict(p.parameters), pb.PipelineRequest())
    assert list(again.prompts) == [PROMPT] and again.seed == 3 and again.steps == STEPS and again.guidance == 4.0
    assert (again.width, again.height, again.sampler, again.shift) == (64, 64, "euler", 1.0)
    assert set(again.models) == {"text_encoder", "denoiser", "autoencoder"}
    events = list(stub.Generate(pb.GenerateRequest(request=again), timeout=120))
    (redo,) = events[-1].result.outputs
    assert redo.seed == 3 and redo.provenance.parameters == p.parameters
    assert np.abs(_pixels(_read_url(redo.artifact.uri)) - _pixels(_read_url(first.artifact.uri))).max() <= 1
    # The same request again stores nothing new: the same artifact, with the provenance it was first stored with.
    events = list(stub.Generate(pb.GenerateRequest(request=again), timeout=120))
    assert events[-1].result.outputs[0].artifact == redo.artifact
    assert events[-1].result.outputs[0].provenance == redo.provenance


def test_another_tenant_gets_its_own_artifacts(stub, orchestrator) -> None:
    request = pb.PipelineRequest(pipeline="text_to_image", prompts=["a green cone"], seed=9, steps=2)
    events = list(stub.Generate(pb.GenerateRequest(request=request), timeout=120,
                                metadata=(("kinema-tenant", "acme"),)))  # fmt: skip
    (output,) = events[-1].result.outputs
    assert "/acme/" in output.artifact.uri
    with pytest.raises(grpc.RpcError) as info:
        stub.GetArtifact(pb.GetArtifactRequest(sha256=output.artifact.sha256), timeout=10)  # tenant "default"
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_drawn_seed_is_reported(stub) -> None:
    request = pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube", "a cone"], steps=1)
    outputs = list(stub.Generate(pb.GenerateRequest(request=request), timeout=120))[-1].result.outputs
    assert outputs[1].seed == outputs[0].seed + 1 and outputs[0].provenance.seed == outputs[0].seed


def test_list_models_lists_every_capability(stub) -> None:
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    # the video denoiser is the denoiser service's video model (edit_video); no depth service is set here
    assert [c.capability for c in reply.capabilities] == ["autoencoder", "denoiser", "text_encoder", "video_denoiser"]
    assert all(c.available and c.models and c.default_model for c in reply.capabilities)
    (only,) = stub.ListModels(pb.ListModelsRequest(capability="denoiser"), timeout=30).capabilities
    assert only.default_model == "denoiser"


def test_bad_inputs_from_the_services(stub) -> None:
    request = pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"], steps=2, width=12, height=12)
    with pytest.raises(grpc.RpcError) as info:  # not a multiple of the model's pixel patch: known to the services
        list(stub.Generate(pb.GenerateRequest(request=request), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "width" in info.value.details()
    request = pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"], steps=2)
    request.models["denoiser"].name = "denoiser_nope"
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(request=request), timeout=60))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    detail = parse_error_detail(info.value.trailing_metadata())
    assert (detail.reason, detail.field) == ("MODEL_NOT_FOUND", "models.denoiser")
    request.models["denoiser"].name = "denoiser"  # an explicit default model runs
    request.models["autoencoder"].version = "1"
    assert list(stub.Generate(pb.GenerateRequest(request=request), timeout=60))[-1].result.outputs


def test_cancel_stops_the_denoiser_and_stores_nothing(stub, services, orchestrator) -> None:
    before_files = sorted(p for p in orchestrator.artifacts.rglob("*") if p.is_file())
    request = pb.PipelineRequest(pipeline="text_to_image", prompts=["a purple cube"], seed=11, steps=1000)
    call = stub.Generate(pb.GenerateRequest(request=request), timeout=120)
    seen = 0
    for event in call:
        seen += event.HasField("progress")
        if seen == 3:
            call.cancel()
            break
    time.sleep(1.0)  # let an evaluation in flight finish
    calls = model_calls(services["denoiser"])
    time.sleep(1.5)
    assert model_calls(services["denoiser"]) == calls  # the service's loop stopped
    assert sorted(p for p in orchestrator.artifacts.rglob("*") if p.is_file()) == before_files
