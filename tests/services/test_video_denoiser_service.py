"""The denoiser service's SampleVideo over real gRPC, served by the real Triton of tests/conftest.py (its `triton` and
`services` fixtures: the session's Triton loads `video_denoiser` with every other SERVED_MODELS entry).

A served clip must equal `LocalVideoDenoiser` over the VideoMMDiT in this process for the same inputs (<= 1e-5, as
the image denoiser's Sample), for text content through raw gRPC and for reference-frame content with SDEdit over a
clip longer than the window through `RemoteVideoDenoiser`; `edit_video` over the four gRPC clients (`connect_video`)
equals the embedded run.
"""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch

from kinema.common.v1 import common_pb2
from kinema.data import World
from kinema.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from kinema.errors import InvalidInput, NotFound
from kinema.nn.text import TextEmbedding
from kinema.pipelines.edit_video import EditVideoRequest, edit_video
from kinema.pipelines.local import LocalVideoDenoiser, load_local_video
from kinema.pipelines.protocols import VideoSpec
from kinema.pipelines.remote import RemoteVideoDenoiser, connect_video, open_channel
from kinema.repository import default_models_dir, load_video_denoiser
from kinema.rpc import tensors
from kinema.rpc.process import ServiceProcess
from kinema.rpc.status import parse_error_detail
from kinema.sampling.samplers import initial_noise

pytestmark = pytest.mark.slow

F, SIZE = 4, (8, 8)  # a 4-frame clip of 32 x 32 px: 16 tokens a frame


@pytest.fixture(scope="module")
def local() -> LocalVideoDenoiser:
    return LocalVideoDenoiser(*load_video_denoiser(default_models_dir()))


@pytest.fixture(scope="module")
def channel(services):
    with open_channel(services["denoiser"].address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(channel):
    return denoiser_pb2_grpc.DenoiserStub(channel)


def _text(length: int, real: int, seed: int) -> TextEmbedding:
    """Text-like conditioning of the model's widths (MiniLM: 384), `real` of `length` tokens unmasked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < real  # (1, L)
    return TextEmbedding(torch.randn(1, length, 384, generator=g), mask, torch.randn(1, 384, generator=g), [False])


def _structure(seed: int = 5, frames: int = F) -> torch.Tensor:
    return torch.rand(1, frames, 1, *SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (1, F, 1, h, w)


def _conditioning(e: TextEmbedding) -> denoiser_pb2.Conditioning:
    return denoiser_pb2.Conditioning(tokens=tensors.encode(e.tokens), mask=tensors.encode(e.mask),
                                     pooled=tensors.encode(e.pooled))  # fmt: skip


COND, UNCOND = _text(12, 9, 1), _text(6, 1, 2)
SPEC = VideoSpec(steps=3, guidance=4.0, temporal_guidance=1.5, structure_level=0.3)


def _request(**overrides) -> denoiser_pb2.SampleVideoRequest:
    fields = {"noise": tensors.encode(initial_noise((1, F, 4, *SIZE), 0)), "cond": _conditioning(COND),
              "uncond": _conditioning(UNCOND), "steps": SPEC.steps, "guidance": SPEC.guidance,
              "temporal_guidance": SPEC.temporal_guidance, "structure": tensors.encode(_structure()),
              "structure_level": SPEC.structure_level} | overrides  # fmt: skip
    return denoiser_pb2.SampleVideoRequest(**fields)


def test_sample_video_equals_the_in_process_loop_and_streams_progress(stub, local):
    events = list(stub.SampleVideo(_request(), timeout=120))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [(p.step, p.total) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    assert not any(p.HasField("preview") for p in progress)
    assert events[-1].HasField("result") and sum(e.HasField("result") for e in events) == 1
    result = events[-1].result
    got = tensors.decode(result.latents, "latents")
    noise = initial_noise((1, F, 4, *SIZE), 0)
    want = local.sample_clip(noise, COND, UNCOND, _structure(), SPEC, None)
    assert got.shape == (1, F, 4, *SIZE)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    model = result.model
    assert (model.name, model.version, model.sha256) == ("video_denoiser", "1", local.fingerprint())


def test_remote_client_samples_reference_content_with_sdedit_in_windows(channel, local):
    """RemoteVideoDenoiser (the pipelines' client) = LocalVideoDenoiser for a clip longer than its window."""
    remote = RemoteVideoDenoiser(channel)
    assert (remote.latent_channels, remote.max_frames) == (local.latent_channels, local.max_frames)
    assert remote.fingerprint() == local.fingerprint()
    frames = 7
    noise = initial_noise((1, frames, 4, *SIZE), 7)
    reference = initial_noise((1, 4, *SIZE), 8)  # a content frame's latent
    init = initial_noise((1, frames, 4, *SIZE), 9)
    spec = VideoSpec(steps=4, guidance=3.0, temporal_guidance=1.0, structure_level=0.0, shift=2.0, start_step=1)
    steps = []
    kwargs = {"init_latents": init, "window": 4, "overlap": 2}
    structure = _structure(6, frames)
    got = remote.sample_clip(noise, reference, UNCOND, structure, spec, lambda i, n, x: steps.append((i, n, x)),
                             **kwargs)  # fmt: skip
    want = local.sample_clip(noise, reference, UNCOND, structure, spec, None, **kwargs)
    assert steps == [(0, 3, None), (1, 3, None), (2, 3, None)]  # steps - start_step
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    whole = local.sample_clip(noise, reference, UNCOND, structure, spec, None, init_latents=init)
    assert not torch.allclose(got, whole, atol=1e-3)  # the window was used, not the whole clip at once


def test_list_models_lists_the_video_model_with_its_params(stub):
    reply = stub.ListModels(denoiser_pb2.ListModelsRequest(), timeout=10)
    assert (reply.default_model, reply.default_video_model) == ("denoiser", "video_denoiser")
    listed = {m.name: m for m in reply.models}
    assert {"denoiser", "video_denoiser"} <= set(listed)
    params = json.loads(listed["video_denoiser"].params_json)
    assert (params["in_channels"], params["max_frames"], params["structure_channels"]) == (4, 64, 1)
    only = stub.ListModels(denoiser_pb2.ListModelsRequest(model=common_pb2.ModelRef(name="video_denoiser")), timeout=10)
    assert [(m.name, m.version) for m in only.models] == [("video_denoiser", "1")]
    images = stub.ListModels(denoiser_pb2.ListModelsRequest(model=common_pb2.ModelRef(name="denoiser")), timeout=10)
    assert "video_denoiser" not in {m.name for m in images.models}


def _ref(name: str, version: str = "") -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name, version=version)


def _t(a: np.ndarray) -> common_pb2.Tensor:
    return tensors.encode(np.asarray(a, np.float32))


CLIP = (1, F, 4, *SIZE)
BAD = [
    # (request fields, status, field the error names, words in the message)
    ({"noise": _t(np.zeros((F, 4, *SIZE)))}, "INVALID", "noise", "5 dimensions"),
    ({"noise": _t(np.zeros((2, F, 4, *SIZE)))}, "INVALID", "noise", "one clip"),
    ({"noise": _t(np.zeros((1, F, 3, *SIZE)))}, "INVALID", "noise", "4 channels"),
    ({"noise": _t(np.zeros((1, F, 4, 8, 7)))}, "INVALID", "noise", "multiple of 2"),
    ({"noise": _t(np.zeros((1, 65, 4, 2, 2))), "structure": _t(np.zeros((1, 65, 1, 2, 2)))}, "INVALID", "window",
     "at most 64"),
    ({"window": 65}, "INVALID", "window", "2..64"),
    ({"window": 1}, "INVALID", "window", "2..64"),
    ({"window": 4, "overlap": 4}, "INVALID", "overlap", "0..window-1"),
    ({"window": 4, "overlap": -1}, "INVALID", "overlap", "0..window-1"),
    ({"structure": _t(np.zeros((1, F, 1, 8, 6)))}, "INVALID", "structure", "shape"),
    ({"structure": common_pb2.Tensor()}, "INVALID", "structure", "dtype"),
    ({"structure_level": 1.5}, "INVALID", "structure_level", "[0, 1]"),
    ({"structure_level": -0.25}, "INVALID", "structure_level", "[0, 1]"),
    ({"temporal_guidance": -1.0}, "INVALID", "temporal_guidance", "temporal_guidance"),
    ({"steps": 0}, "INVALID", "steps", "steps"),
    ({"guidance": float("nan")}, "INVALID", "guidance", "guidance"),
    ({"start_step": 1}, "INVALID", "init_latents", "init_latents"),
    ({"start_step": 1, "init_latents": _t(np.zeros((1, F, 4, 8, 6)))}, "INVALID", "init_latents", "must agree"),
    ({"cond": None}, "INVALID", "cond", "content"),
    ({"cond": None, "reference_latent": _t(np.zeros((1, 3, *SIZE)))}, "INVALID", "reference_latent", "(1, 4"),
    ({"cond": _conditioning(TextEmbedding(torch.zeros(1, 3, 10), torch.ones(1, 3, dtype=torch.bool),
                                          torch.zeros(1, 384), [False]))}, "INVALID", "cond", "384"),
    ({"uncond": None}, "INVALID", "uncond", "guidance != 1"),
    ({"model": _ref("denoiser")}, "INVALID", "model.name", "Sample"),
    ({"model": _ref("video_denoiser", "9")}, "NOT_FOUND", "", "video_denoiser"),
    ({"model": _ref("gen1")}, "NOT_FOUND", "model.name", "gen1"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "code", "field", "words"), BAD, ids=[f"{b[2] or 'model'}-{i}" for i, b in
                                                                         enumerate(BAD)])  # fmt: skip
def test_bad_input_is_a_clear_status_naming_the_field(stub, fields, code, field, words):
    request = _request(**{k: v for k, v in fields.items() if v is not None})
    for name in (k for k, v in fields.items() if v is None):
        request.ClearField(name)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.SampleVideo(request, timeout=60))
    err = info.value
    want = grpc.StatusCode.INVALID_ARGUMENT if code == "INVALID" else grpc.StatusCode.NOT_FOUND
    assert err.code() == want, err.details()
    assert words.lower() in err.details().lower() and "Traceback" not in err.details()
    detail = parse_error_detail(err.trailing_metadata())
    assert (detail.field if detail is not None else "") == field, detail


def test_each_family_stays_on_its_own_rpcs(stub, channel):
    noise = tensors.encode(initial_noise((1, 4, 16, 16), 0))
    cond = _conditioning(_text(4, 4, 0))
    image_calls = [
        lambda: list(stub.Sample(denoiser_pb2.SampleRequest(model=_ref("video_denoiser"), noise=noise, cond=cond,
                                                            steps=2, guidance=1.0), timeout=30)),
        lambda: stub.Predict(denoiser_pb2.PredictRequest(model=_ref("video_denoiser"), x=noise, cond=cond,
                                                         t=_t(np.ones(1))), timeout=30),
    ]  # fmt: skip
    for call in image_calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "SampleVideo" in info.value.details()
        assert parse_error_detail(info.value.trailing_metadata()).reason == "WRONG_MODEL_KIND"
    # The client: a video client naming an image model, or an unknown one, gets the typed errors.
    with pytest.raises(InvalidInput) as bad:
        RemoteVideoDenoiser(channel, model="denoiser").sample_clip(
            initial_noise(CLIP, 0), COND, UNCOND, _structure(), SPEC, None
        )
    assert (bad.value.reason, bad.value.field) == ("WRONG_MODEL_KIND", "model.name")
    with pytest.raises(NotFound):
        _ = RemoteVideoDenoiser(channel, model="video_denoiser", version="9").max_frames


def _video_calls(service) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith('kinema_model_seconds_count{backend="triton",model="video_denoiser"}'):
            return float(line.split()[-1])
    return 0.0


def test_client_cancel_stops_video_sampling(stub, services):
    start = _video_calls(services["denoiser"])
    call = stub.SampleVideo(_request(steps=1000), timeout=120)
    seen = []
    for event in call:
        seen.append(event.progress.step)
        if len(seen) == 3:
            call.cancel()
            break
    time.sleep(0.5)  # let an evaluation in flight finish
    before = _video_calls(services["denoiser"])
    time.sleep(1.5)
    assert _video_calls(services["denoiser"]) == before  # no more network calls after the cancel
    # 2 evaluations per step (frame-wise cond + uncond batched, then the video branch), far from 2000
    assert seen == [1, 2, 3] and before - start < 2 * 20


@pytest.fixture(scope="module")
def depth_service(triton, tmp_path_factory):
    env = {"KINEMA_BACKEND": "triton", "KINEMA_TRITON_URL": triton.grpc_url}
    proc = ServiceProcess("depth", tmp_path_factory.mktemp("depth-service"), **env).start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("content", ["prompt", "image"])
def test_edit_video_over_grpc_equals_the_embedded_run(services, depth_service, content):
    """The distributed shape of `edit_video`: depth, text, autoencoder and video denoiser services behind the four
    clients `connect_video` gives; two overlapping windows, keyframe content from an image in one case."""
    frames = np.round(World().clip("test", 3, 6).rgb * 255).astype(np.uint8)  # (6, 64, 64, 3)
    fields = {"prompt": "a red cube"} if content == "prompt" else {"content_image": frames[0][:, ::-1].copy()}
    request = EditVideoRequest(**fields, steps=2, width=32, height=32, window=4, overlap=2, structure=0.2,
                               temporal_guidance=1.5, seed=4)  # fmt: skip
    addresses = [s.address for s in (services["text_encoder"], depth_service, services["denoiser"],
                                      services["autoencoder"])]  # fmt: skip
    remote = connect_video(*addresses)
    try:
        outputs = []
        for nets in (remote, load_local_video()):
            out, steps = [], []
            result = edit_video(request, lambda: iter(frames), out.append, *nets,
                                callback=lambda i, n, _x, seen=steps: seen.append((i, n)))  # fmt: skip
            outputs.append((result, np.stack(out), steps))
    finally:
        for client in remote:
            client.close()
    (got, got_frames, got_steps), (want, want_frames, want_steps) = outputs
    assert got_frames.shape == (6, 32, 32, 3)
    assert got.windows == want.windows == [[(0, 4), (2, 6)], [(0, 4), (1, 5), (2, 6)]]  # stride 2: offsets 0, 1
    assert np.abs(got_frames.astype(int) - want_frames.astype(int)).max() <= 1
    assert got_steps == want_steps == [(0, 2), (1, 2)]  # steps over the whole clip, every window in each
    assert got.models == want.models and all(len(h) == 64 for h in got.models.values())
