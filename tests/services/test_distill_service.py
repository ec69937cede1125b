"""The distill service over real gRPC, served by the real Triton of tests/conftest.py (its `triton` and `distill`
fixtures), which loads the shipped 4-step student with the other models the chart and stack serve
(kinema.rpc.process.SERVED_MODELS).

Results must equal the embedded few-step sampler (`kinema.pipelines.local.LocalStudent` over
`kinema.sampling.student`) for the same inputs and seed (<= 1e-5); the remote client (`RemoteStudent`) runs the
same text_to_image as embedded mode.
"""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kinema.common.v1 import common_pb2
from kinema.denoiser.v1 import denoiser_pb2
from kinema.distill.v1 import distill_pb2, distill_pb2_grpc
from kinema.errors import InvalidInput
from kinema.nn.checkpoint import sha256_file
from kinema.nn.text import TextEmbedding
from kinema.pipelines import TextToImageRequest, text_to_image
from kinema.pipelines.local import LocalStudent, load_local
from kinema.pipelines.remote import open_channel
from kinema.pipelines.remote_distill import RemoteStudent
from kinema.pipelines.student import StudentFacts
from kinema.repository import default_models_dir, load_denoiser
from kinema.rpc import tensors
from kinema.rpc.process import ServiceProcess
from kinema.rpc.status import parse_error_detail
from kinema.sampling.samplers import initial_noise

pytestmark = pytest.mark.slow

SERVICE = "kinema.distill.v1.Distill"
MODELS = default_models_dir()
STUDENT_SHA = sha256_file(MODELS / "denoiser_4step/1/mmdit.safetensors")
STUDENT2_SHA = sha256_file(MODELS / "denoiser_2step/1/mmdit.safetensors")
TEACHER_SHA = sha256_file(MODELS / "denoiser/1/mmdit.safetensors")


@pytest.fixture(scope="module")
def stub(distill):
    with distill.channel() as channel:
        yield distill_pb2_grpc.DistillStub(channel)


@pytest.fixture(scope="module")
def embedded() -> LocalStudent:
    model, sha = load_denoiser(MODELS, name="denoiser_4step")
    return LocalStudent(model, sha, StudentFacts(4, "denoiser", TEACHER_SHA))


def _cond(b: int, seed: int = 0, length: int = 8) -> TextEmbedding:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, length - 2 :] = False  # padding, as a text encoder leaves it
    return TextEmbedding(torch.randn(b, length, 384, generator=g), mask, torch.randn(b, 384, generator=g), [False] * b)


def _wire(e: TextEmbedding) -> denoiser_pb2.Conditioning:
    return denoiser_pb2.Conditioning(tokens=tensors.encode(e.tokens), mask=tensors.encode(e.mask),
                                     pooled=tensors.encode(e.pooled))  # fmt: skip


def _request(b: int = 1, side: int = 16, **fields) -> distill_pb2.SampleRequest:
    noise = torch.cat([initial_noise((1, 4, side, side), 100 + i) for i in range(b)])
    return distill_pb2.SampleRequest(**({"noise": tensors.encode(noise), "cond": _wire(_cond(b))} | fields))


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str, grpc.RpcError]:
    with pytest.raises(grpc.RpcError) as info:
        list(call(*args, **kwargs))
    err = info.value
    assert "Traceback" not in (err.details() or "")
    return err.code(), err.details(), err


def test_health_and_reflection(distill):
    with distill.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert SERVICE in {s.name for s in reply.list_services_response.service}
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=SERVICE)]))  # fmt: skip
        assert reply.file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize(
    ("fields", "times"),
    [
        ({"seed": 7}, [1.0, 0.75, 0.5, 0.25]),  # steps 0: the student's own 4 steps
        ({"steps": 2, "seeds": [11, 12]}, [1.0, 0.5]),  # one stream per row
        ({"timesteps": [0.9, 0.4], "seed": 3}, [0.9, 0.4]),
        ({"steps": 1}, [1.0]),
    ],
)
def test_sample_streams_progress_and_equals_the_embedded_sampler(stub, embedded, fields, times):
    request = _request(b=2, **fields)
    events = list(stub.Sample(request, timeout=120))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [(p.step, p.total) for p in progress] == [(i, len(times)) for i in range(1, len(times) + 1)]
    assert all(not p.HasField("preview") for p in progress)
    assert events[-1].HasField("result") and sum(e.HasField("result") for e in events) == 1
    result = events[-1].result
    assert list(result.timesteps) == pytest.approx(times)
    assert (result.model.name, result.model.version, result.model.sha256) == ("denoiser_4step", "1", STUDENT_SHA)

    noise = torch.from_numpy(tensors.decode(request.noise, "noise", writable=True))
    want = embedded.sample_few(noise, _cond(2), None, steps=request.steps, timesteps=list(request.timesteps),
                               seed=request.seed, seeds=list(request.seeds))  # fmt: skip
    np.testing.assert_allclose(tensors.decode(result.latents, "latents"), want.numpy(), atol=1e-5)


def test_per_row_seeds_make_a_row_independent_of_its_batch(stub):
    batch = _request(b=2, seeds=[11, 12])
    got = tensors.decode(list(stub.Sample(batch, timeout=60))[-1].result.latents, "x")
    noise = tensors.decode(batch.noise, "noise")[1:]
    cond = _cond(2)
    row = TextEmbedding(cond.tokens[1:], cond.mask[1:], cond.pooled[1:], [False])
    alone = distill_pb2.SampleRequest(noise=tensors.encode(noise), cond=_wire(row), seeds=[12])
    alone_latents = tensors.decode(list(stub.Sample(alone, timeout=60))[-1].result.latents, "x")
    np.testing.assert_allclose(alone_latents[0], got[1], atol=1e-4)  # batch-size rounding only
    other = _request(b=2, seeds=[11, 13])
    assert np.abs(tensors.decode(list(stub.Sample(other, timeout=60))[-1].result.latents, "x")[1] - got[1]).max() > 0.01


def test_list_models_shows_the_students_with_their_teacher_and_schedule(stub):
    reply = stub.ListModels(distill_pb2.ListModelsRequest(), timeout=10)
    assert reply.default_model == "denoiser_4step"
    listed = {m.name: m for m in reply.models}
    assert {name: (m.version, m.sha256) for name, m in listed.items()} == {
        "denoiser_4step": ("1", STUDENT_SHA),
        "denoiser_2step": ("1", STUDENT2_SHA),
    }
    params = json.loads(listed["denoiser_4step"].params_json)  # under Triton: the student facts (no network params)
    assert params == {"student_steps": 4, "timesteps": [1.0, 0.75, 0.5, 0.25], "teacher": "denoiser",
                      "teacher_sha256": TEACHER_SHA}  # fmt: skip
    params = json.loads(listed["denoiser_2step"].params_json)  # trained as a 2-step student, not a 4-step one cut
    assert (params["student_steps"], params["timesteps"], params["teacher_sha256"]) == (2, [1.0, 0.5], TEACHER_SHA)
    none = stub.ListModels(distill_pb2.ListModelsRequest(model=common_pb2.ModelRef(name="denoiser_none")), timeout=10)
    assert list(none.models) == []


def test_bad_input_gets_a_clear_status_and_the_service_stays_up(stub, distill):
    nan = np.full((1, 4, 16, 16), np.nan, np.float32)
    ref = common_pb2.ModelRef
    cases = [
        (_request(steps=9), "INVALID", "1..8", "steps"),
        (_request(steps=-1), "INVALID", "1..8", "steps"),
        (_request(steps=3), "INVALID", "[1, 2, 4]", "steps"),
        (_request(steps=3, timesteps=[0.9, 0.4]), "INVALID", "!=", "steps"),
        (_request(timesteps=[0.5, 0.9]), "INVALID", "decreasing", "timesteps"),
        (_request(timesteps=[0.5, 0.5]), "INVALID", "decreasing", "timesteps"),
        (_request(timesteps=[1.5, 0.5]), "INVALID", "(0, 1]", "timesteps"),
        (_request(timesteps=[0.5, 0.0]), "INVALID", "(0, 1]", "timesteps"),
        (_request(timesteps=[1 - k / 10 for k in range(9)]), "INVALID", "at most 8", "timesteps"),
        (_request(model=ref(name="midas")), "NOT_FOUND", "midas", "model.name"),
        (_request(model=ref(name="denoiser")), "NOT_FOUND", "the teacher, not a distilled student", "model.name"),
        (_request(model=ref(name="denoiser_4step", version="9")), "NOT_FOUND", "denoiser_4step", ""),
        (_request(model=ref(version="x")), "INVALID", "version", "model.version"),
        (_request(noise=tensors.encode(np.zeros((4, 16, 16), np.float32))), "INVALID", "noise", "noise"),
        (_request(noise=tensors.encode(np.zeros((1, 4, 16, 16), np.int32))), "INVALID", "noise", "noise"),
        (_request(noise=tensors.encode(nan)), "INVALID", "NaN", "noise"),
        (_request(noise=tensors.encode(np.zeros((1, 3, 16, 16), np.float32))), "INVALID", "channels", ""),
        (_request(noise=tensors.encode(np.zeros((1, 4, 15, 15), np.float32))), "INVALID", "multiple of 2", ""),
        (_request(cond=_wire(_cond(2))), "INVALID", "rows", "cond"),
        (_request(cond=denoiser_pb2.Conditioning()), "INVALID", "cond", "cond.tokens"),
        (_request(b=2, seeds=[1]), "INVALID", "one per row", "seeds"),
        (_request(seeds=[1], seed=2), "INVALID", "seed must be 0", "seed"),
        (_request(b=17), "INVALID", "limit of 16", "noise"),
    ]  # fmt: skip
    for request, code, words, field in cases:
        got, details, err = _code(stub.Sample, request, timeout=60)
        want = grpc.StatusCode.INVALID_ARGUMENT if code == "INVALID" else grpc.StatusCode.NOT_FOUND
        assert got == want, (details, code, words)
        assert words.lower() in details.lower(), details
        if field:
            detail = parse_error_detail(err.trailing_metadata())
            assert detail is not None and detail.field == field, (details, detail)
    assert distill.proc.poll() is None  # still up, still right
    assert list(stub.Sample(_request(steps=1), timeout=60))[-1].HasField("result")


def _student_calls(service: ServiceProcess) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith('kinema_model_seconds_count{backend="triton",model="denoiser_4step"}'):
            return float(line.split()[-1])
    return 0.0


def test_client_cancel_stops_the_loop(stub, distill):
    """8 slow steps (4 latents of 64x64, the largest the student takes); cancel after two: no call after it."""
    start = _student_calls(distill)
    times = [1 - k / 8 for k in range(8)]
    call = stub.Sample(_request(b=4, side=64, timesteps=times, seed=1), timeout=300)
    seen = []
    for event in call:
        seen.append(event.progress.step)
        if len(seen) == 2:
            call.cancel()
            break
    time.sleep(2.0)  # let an evaluation in flight finish
    before = _student_calls(distill)
    time.sleep(3.0)
    assert _student_calls(distill) == before  # no more network calls after the cancel
    assert seen == [1, 2] and before - start <= 3  # one evaluation per step, far from 8


def test_local_backend_serves_the_same_results(stub, tmp_path):
    """KINEMA_BACKEND=local runs the same network in the service process (embedded and development)."""
    local = ServiceProcess("distill", tmp_path, KINEMA_BACKEND="local").start()
    try:
        request = _request(b=2, seed=5)
        with local.channel() as channel:
            local_stub = distill_pb2_grpc.DistillStub(channel)
            got = list(local_stub.Sample(request, timeout=120))[-1].result
            listed = local_stub.ListModels(distill_pb2.ListModelsRequest(), timeout=30)
        want = list(stub.Sample(request, timeout=120))[-1].result
        np.testing.assert_allclose(tensors.decode(got.latents, "x"), tensors.decode(want.latents, "x"), atol=1e-5)
        assert got.model.sha256 == want.model.sha256 == STUDENT_SHA
        names = [m.name for m in listed.models]
        assert sorted(names) == ["denoiser_2step", "denoiser_4step"]  # the teacher is in the repository, not listed
        params = json.loads(listed.models[names.index("denoiser_4step")].params_json)
        assert params["in_channels"] == 4 and params["student_steps"] == 4  # network params and student facts
    finally:
        local.stop()


class Recorded:
    """A Student that keeps the latents it returns, to compare both shapes before decoding."""

    def __init__(self, inner) -> None:
        self.inner, self.latents = inner, None
        self.default_steps = inner.default_steps

    @property
    def latent_channels(self) -> int:
        return self.inner.latent_channels

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def sample_few(self, *args, **kwargs) -> torch.Tensor:
        self.latents = self.inner.sample_few(*args, **kwargs)
        return self.latents


def test_text_to_image_with_the_remote_student_equals_the_embedded_run(distill):
    te, local_student, ae = load_local(MODELS, "denoiser_4step")
    with open_channel(distill.address) as channel:
        remote = RemoteStudent(channel, latent_channels=lambda: ae.latent_channels)
        assert (remote.default_steps, remote.latent_channels, remote.fingerprint()) == (4, 4, STUDENT_SHA)
        request = TextToImageRequest(prompts=["a red cube", "a green cone"], seed=3, steps=4, guidance=1.0)
        got, want = Recorded(remote), Recorded(local_student)
        seen = []
        a = text_to_image(request, te, got, ae, callback=lambda i, n, x: seen.append((i, n)))
        b = text_to_image(request, te, want, ae)
        assert seen == [(i, 4) for i in range(4)]
        torch.testing.assert_close(got.latents, want.latents, atol=1e-5, rtol=0)
        assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1
        assert a.models["denoiser"] == b.models["denoiser"] == STUDENT_SHA

        with pytest.raises(InvalidInput) as info:  # the service's own check, as a domain error
            remote.sample_few(torch.zeros(1, 4, 16, 16), _cond(1), None, steps=3)
        assert info.value.field == "steps"

        class Cancelled(Exception):
            pass

        def cancel(i, n, x):
            raise Cancelled

        with pytest.raises(Cancelled):  # a callback that raises cancels the call and propagates
            remote.sample_few(torch.zeros(1, 4, 16, 16), _cond(1), cancel)
