"""Every RPC of the text_encoder, autoencoder and denoiser services over real gRPC, served by a real Triton.

Results must equal the embedded library's for the same inputs and seeds (<= 1e-5).
"""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kinema.autoencoder.v1 import autoencoder_pb2, autoencoder_pb2_grpc
from kinema.common.v1 import common_pb2
from kinema.data import World
from kinema.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from kinema.nn.text import TextEmbedding
from kinema.pipelines.local import load_local
from kinema.pipelines.protocols import SampleSpec
from kinema.rpc import tensors
from kinema.rpc.status import parse_error_detail
from kinema.sampling.samplers import initial_noise
from kinema.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from kinema.train.autoencoder import to_tensor

pytestmark = pytest.mark.slow

PROMPTS = ["a small red sphere to the left of a blue cube", "two green cones"]
SERVICES = {
    "text_encoder": "kinema.text_encoder.v1.TextEncoder",
    "autoencoder": "kinema.autoencoder.v1.Autoencoder",
    "denoiser": "kinema.denoiser.v1.Denoiser",
}


@pytest.fixture(scope="module")
def local():
    return load_local()


@pytest.fixture(scope="module")
def stubs(services):
    channels = [s.channel() for s in services.values()]
    yield {
        "text_encoder": text_encoder_pb2_grpc.TextEncoderStub(channels[0]),
        "autoencoder": autoencoder_pb2_grpc.AutoencoderStub(channels[1]),
        "denoiser": denoiser_pb2_grpc.DenoiserStub(channels[2]),
    }
    for c in channels:
        c.close()


def _cond(stubs, prompts: list[str]) -> denoiser_pb2.Conditioning:
    r = stubs["text_encoder"].Encode(text_encoder_pb2.EncodeRequest(prompts=prompts), timeout=30)
    return denoiser_pb2.Conditioning(tokens=r.tokens, mask=r.mask, pooled=r.pooled)


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str, grpc.RpcError]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    err = info.value
    assert "Traceback" not in (err.details() or "")
    return err.code(), err.details(), err


def test_health_and_reflection_list_every_service(services):
    for name, full in SERVICES.items():
        with services[name].channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", full):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            listed = {s.name for s in reply.list_services_response.service}
            assert {full, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
            # grpcurl-style: the file descriptor of the service resolves from the server alone
            req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=full)
            (reply,) = stub.ServerReflectionInfo(iter([req]))
            assert reply.file_descriptor_response.file_descriptor_proto


def test_text_encoder_matches_embedded(stubs, local):
    text_encoder = local[0]
    r = stubs["text_encoder"].Encode(text_encoder_pb2.EncodeRequest(prompts=PROMPTS), timeout=30)
    e = text_encoder.encode(PROMPTS)
    tokens, mask = tensors.decode(r.tokens, "tokens"), tensors.decode(r.mask, "mask", np.bool_)
    assert tokens.shape == tuple(e.tokens.shape) and mask.shape == tuple(e.mask.shape)
    np.testing.assert_array_equal(mask, e.mask.numpy())
    np.testing.assert_allclose(tokens, e.tokens.numpy(), atol=1e-5)
    np.testing.assert_allclose(tensors.decode(r.pooled, "pooled"), e.pooled.numpy(), atol=1e-5)
    assert list(r.truncated) == [False, False] and r.max_length == 32
    assert r.model.name == "text_encoder" and r.model.sha256 == text_encoder.fingerprint()

    long = "a red sphere " * 40
    r = stubs["text_encoder"].Encode(text_encoder_pb2.EncodeRequest(prompts=[long, "a cube"]), timeout=30)
    assert list(r.truncated) == [True, False]


def test_autoencoder_round_trip_matches_embedded(stubs, local):
    autoencoder = local[2]
    images = to_tensor(World().images("test", 0, 3)[0])  # (3, 3, 64, 64)
    stub = stubs["autoencoder"]
    enc = stub.Encode(autoencoder_pb2.EncodeRequest(images=tensors.encode(images)), timeout=30)
    latents = tensors.decode(enc.latents, "latents")
    np.testing.assert_allclose(latents, autoencoder.encode(images).numpy(), atol=1e-5)
    assert (enc.downscale, enc.latent_channels) == (4, 4)
    dec = stub.Decode(autoencoder_pb2.DecodeRequest(latents=enc.latents), timeout=30)
    np.testing.assert_allclose(
        tensors.decode(dec.images, "images"), autoencoder.decode(torch.from_numpy(latents.copy())).numpy(), atol=1e-5
    )
    assert dec.model.name == "vae_decoder" and len(dec.model.sha256) == 64

    sampled = [
        tensors.decode(stub.Encode(autoencoder_pb2.EncodeRequest(images=tensors.encode(images), sample=True,
                                                                 seed=7), timeout=30).latents, "latents")
        for _ in range(2)
    ]  # fmt: skip
    np.testing.assert_array_equal(sampled[0], sampled[1])  # the seed reproduces the posterior sample
    assert 0 < np.abs(sampled[0] - latents).max() < 1.0


def _embedding(c: denoiser_pb2.Conditioning) -> TextEmbedding:
    tokens, mask = tensors.decode(c.tokens, "t", writable=True), tensors.decode(c.mask, "m", np.bool_, writable=True)
    pooled = tensors.decode(c.pooled, "p", writable=True)
    return TextEmbedding(torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(pooled), [])


def test_denoiser_sample_matches_embedded_and_streams_progress(stubs, local):
    denoiser = local[1]
    noise = torch.cat([initial_noise((1, 4, 16, 16), s) for s in (3, 4)])
    cond, uncond = _cond(stubs, PROMPTS), _cond(stubs, [""])
    request = denoiser_pb2.SampleRequest(
        noise=tensors.encode(noise), cond=cond, uncond=uncond, steps=28, guidance=4.0, preview_every=7
    )
    events = list(stubs["denoiser"].Sample(request, timeout=120))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress] == list(range(1, 29)) and {p.total for p in progress} == {28}
    assert [p.step for p in progress if p.HasField("preview")] == [7, 14, 21, 28]
    assert events[-1].HasField("result") and sum(e.HasField("result") for e in events) == 1

    # Same inputs (noise and text tensors) through the embedded loop.
    want = denoiser.sample(noise, _embedding(cond), _embedding(uncond), SampleSpec(28, 4.0), None)
    got = tensors.decode(events[-1].result.latents, "latents")
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert events[-1].result.model.sha256 == denoiser.fingerprint()
    # The last preview is x_0 estimated from the last step: the result itself.
    np.testing.assert_allclose(tensors.decode(progress[-1].preview, "preview"), got, atol=1e-4)


def test_denoiser_predict_matches_embedded(stubs, local):
    text_encoder, denoiser, _ = local
    x = initial_noise((2, 4, 16, 16), 1)
    t = torch.tensor([0.3, 0.9])
    cond = _cond(stubs, PROMPTS)
    request = denoiser_pb2.PredictRequest(x=tensors.encode(x), t=tensors.encode(t), cond=cond)
    v = tensors.decode(stubs["denoiser"].Predict(request, timeout=30).velocity, "velocity")
    # The same inputs: the served text states (padded to the text encoder's max_length; the embedded encoder pads
    # to the longest prompt, and GEMMs over other row counts round differently), as LocalDenoiser runs the model.
    tokens = torch.from_numpy(tensors.decode(cond.tokens, "tokens", writable=True))
    pooled = torch.from_numpy(tensors.decode(cond.pooled, "pooled", writable=True))
    mask = torch.from_numpy(tensors.decode(cond.mask, "mask", dtype=None, writable=True))
    e = text_encoder.encode(PROMPTS)
    torch.testing.assert_close(tokens[:, : e.tokens.shape[1]], e.tokens, rtol=0, atol=1e-5)
    with torch.inference_mode():
        embedded = denoiser.model(x, t, tokens, pooled, mask).numpy()
    np.testing.assert_allclose(v, embedded, atol=1e-5)


def test_list_models(stubs):
    for name, default, members in [
        ("text_encoder", "text_encoder", ["text_encoder"]),
        ("autoencoder", "vae", ["vae_encoder", "vae_decoder"]),
        # Every denoiser_* model Triton serves, the few-step student too (its sampling is the distill service's), and
        # the video model (SampleVideo; ListModelsResponse.default_video_model).
        ("denoiser", "denoiser", ["denoiser", "denoiser_4step", "denoiser_2step", "video_denoiser"]),
    ]:
        reply = stubs[name].ListModels(_list_request(name), timeout=10)
        assert reply.default_model == default
        assert sorted(m.name for m in reply.models) == sorted(members)
        assert all(m.version == "1" and len(m.sha256) == 64 for m in reply.models)
    nothing = stubs["denoiser"].ListModels(
        denoiser_pb2.ListModelsRequest(model=common_pb2.ModelRef(name="denoiser_none")), timeout=10
    )
    assert list(nothing.models) == []


def _list_request(name: str):
    return {"text_encoder": text_encoder_pb2, "autoencoder": autoencoder_pb2, "denoiser": denoiser_pb2}[
        name
    ].ListModelsRequest()


def _sample_request(stubs, **overrides) -> denoiser_pb2.SampleRequest:
    fields = {"noise": tensors.encode(initial_noise((1, 4, 16, 16), 0)), "cond": _cond(stubs, ["a cube"]),
              "uncond": _cond(stubs, [""]), "steps": 4, "guidance": 4.0} | overrides  # fmt: skip
    return denoiser_pb2.SampleRequest(**fields)


def test_bad_input_gets_a_clear_status_and_the_service_stays_up(stubs, services):
    te, ae, dn = stubs["text_encoder"], stubs["autoencoder"], stubs["denoiser"]
    nan = np.full((1, 4, 16, 16), np.nan, np.float32)
    ints, three = np.zeros((1, 4, 16, 16), np.int32), np.zeros((1, 3, 16, 16), np.float32)
    short = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[1, 4, 8, 8], data=b"\0" * 7)
    odd = tensors.encode(np.zeros((1, 3, 30, 30), np.float32))
    cases = [
        # wrong dtype, shape, NaN, out of range, batch over the limit, unknown model
        (dn.Sample, _sample_request(stubs, noise=tensors.encode(ints)), "INVALID", "noise"),
        (dn.Sample, _sample_request(stubs, noise=tensors.encode(three)), "INVALID", "channels"),
        (dn.Sample, _sample_request(stubs, noise=tensors.encode(nan)), "INVALID", "NaN"),
        (dn.Sample, _sample_request(stubs, steps=0), "INVALID", "steps"),
        (dn.Sample, _sample_request(stubs, guidance=-1.0), "INVALID", "guidance"),
        (dn.Sample, _sample_request(stubs, sampler="ddim"), "INVALID", "sampler"),
        (te.Encode, text_encoder_pb2.EncodeRequest(prompts=["x"] * 17), "INVALID", "limit of 16"),
        (te.Encode, text_encoder_pb2.EncodeRequest(), "INVALID", "prompt"),
        (ae.Decode, autoencoder_pb2.DecodeRequest(latents=short), "INVALID", "latents"),
        (ae.Encode, autoencoder_pb2.EncodeRequest(images=odd), "INVALID", "multiple of 4"),
        (te.Encode, text_encoder_pb2.EncodeRequest(prompts=["x"], model=common_pb2.ModelRef(name="clip_l")),
         "NOT_FOUND", "clip_l"),
        (dn.Sample, _sample_request(stubs, model=common_pb2.ModelRef(name="denoiser", version="9")),
         "NOT_FOUND", "denoiser"),
    ]  # fmt: skip
    for call, request, code, words in cases:
        got, details, err = _code(call, request, timeout=30)
        want = grpc.StatusCode.INVALID_ARGUMENT if code == "INVALID" else grpc.StatusCode.NOT_FOUND
        assert got == want, (details, request)
        assert words.lower() in details.lower(), details
    _, _, err = _code(te.Encode, text_encoder_pb2.EncodeRequest(prompts=["x"] * 17), timeout=10)
    detail = parse_error_detail(err.trailing_metadata())
    assert detail is not None and detail.reason == "BATCH_TOO_LARGE" and detail.field == "prompts"

    # oversize message: over the 4 MiB the services were started with
    big = np.zeros((2, 3, 512, 512), np.float32)  # 6 MiB
    got, details, _ = _code(ae.Encode, autoencoder_pb2.EncodeRequest(images=tensors.encode(big)), timeout=30)
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED

    # a deadline shorter than the work
    got, _, _ = _code(dn.Sample, _sample_request(stubs, steps=1000), timeout=0.5)
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED

    for s in services.values():  # still up, still right
        assert s.proc.poll() is None
    assert te.Encode(text_encoder_pb2.EncodeRequest(prompts=["a cube"]), timeout=30).model.name == "text_encoder"


def _model_calls(service) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith('kinema_model_seconds_count{backend="triton",model="denoiser"}'):
            return float(line.split()[-1])
    return 0.0


def test_client_cancel_stops_sampling(stubs, services):
    start = _model_calls(services["denoiser"])
    call = stubs["denoiser"].Sample(_sample_request(stubs, steps=1000), timeout=120)
    seen = []
    for event in call:
        seen.append(event.progress.step)
        if len(seen) == 3:
            call.cancel()
            break
    time.sleep(0.5)  # let an evaluation in flight finish
    before = _model_calls(services["denoiser"])
    time.sleep(1.5)
    assert _model_calls(services["denoiser"]) == before  # no more network calls after the cancel
    assert seen == [1, 2, 3] and before - start < 2 * 20  # 2 evaluations (CFG) per step, far from 2000


def test_metrics_serve_the_documented_families(stubs, services):
    stubs["text_encoder"].Encode(text_encoder_pb2.EncodeRequest(prompts=["a cube"]), timeout=30)
    text = urllib.request.urlopen(f"http://127.0.0.1:{services['text_encoder'].metrics_port}/metrics").read().decode()
    ok = 'service="kinema.text_encoder.v1.TextEncoder",method="Encode",code="OK"'
    assert f"kinema_rpc_requests_total{{{ok}}}" in text.replace(", ", ",") or _has(
        text, "kinema_rpc_requests_total", ok
    )
    for family in ("kinema_rpc_request_seconds_bucket", "kinema_rpc_in_flight_requests", "kinema_model_seconds_count"):
        assert family in text, family
    assert 'kinema_model_seconds_count{backend="triton",model="text_encoder"}' in text


def _has(text: str, family: str, labels: str) -> bool:
    want = set(labels.split(","))
    for line in text.splitlines():
        if line.startswith(family + "{"):
            got = set(line[len(family) + 1 : line.index("}")].split(","))
            if want <= got:
                return True
    return False


def test_concurrent_samples_are_independent(stubs, local):
    """Dynamic batching must not mix requests: two concurrent runs equal their solo results."""
    results = {}

    def run(seed: int) -> None:
        req = _sample_request(stubs, noise=tensors.encode(initial_noise((1, 4, 16, 16), seed)), steps=6)
        results[seed] = tensors.decode(list(stubs["denoiser"].Sample(req, timeout=60))[-1].result.latents, "x")

    threads = [threading.Thread(target=run, args=(s,)) for s in (10, 11, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    solo = tensors.decode(list(stubs["denoiser"].Sample(_sample_request(stubs, noise=tensors.encode(
        initial_noise((1, 4, 16, 16), 11)), steps=6), timeout=60))[-1].result.latents, "x")  # fmt: skip
    # Batched with others vs alone: float rounding differs with batch size (~1e-5 over 6 steps), a mix-up by O(1).
    np.testing.assert_allclose(results[11], solo, atol=1e-4)
    assert np.abs(results[10] - results[11]).max() > 0.1


def test_local_backend_serves_the_same_results(stubs, tmp_path):
    """KINEMA_BACKEND=local runs the same networks in the service process (embedded and development)."""
    from kinema.rpc.process import ServiceProcess

    local = ServiceProcess("denoiser", tmp_path, KINEMA_BACKEND="local").start()
    try:
        x, t = initial_noise((2, 4, 16, 16), 5), torch.tensor([0.2, 0.7])
        request = denoiser_pb2.PredictRequest(x=tensors.encode(x), t=tensors.encode(t), cond=_cond(stubs, PROMPTS))
        with local.channel() as channel:
            got = denoiser_pb2_grpc.DenoiserStub(channel).Predict(request, timeout=30)
        want = stubs["denoiser"].Predict(request, timeout=30)
        np.testing.assert_allclose(tensors.decode(got.velocity, "v"), tensors.decode(want.velocity, "v"), atol=1e-5)
        assert got.model.sha256 == want.model.sha256 and got.model.params_json
    finally:
        local.stop()
