"""The depth service over real gRPC, served by the real Triton of tests/conftest.py (its `triton` fixture).

The session's Triton loads the models the chart and stack serve (kinema.rpc.process.SERVED_MODELS), depth among them.
Results must equal the in-process network's for the same images (<= 1e-5).
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kinema.common.v1 import common_pb2
from kinema.data import World
from kinema.depth.v1 import depth_pb2, depth_pb2_grpc
from kinema.errors import NotFound
from kinema.nn.depth import estimate, load_depth_net
from kinema.pipelines.local import LocalDepth
from kinema.pipelines.remote import RemoteDepth, open_channel
from kinema.repository import default_models_dir
from kinema.rpc import tensors
from kinema.rpc.process import ServiceProcess
from kinema.rpc.status import parse_error_detail
from kinema.train.depth import to_tensor

pytestmark = pytest.mark.slow

SERVICE = "kinema.depth.v1.Depth"
WEIGHTS = default_models_dir() / "depth/1/depth.safetensors"


@pytest.fixture(scope="module")
def service(triton, tmp_path_factory):
    env = {"KINEMA_BACKEND": "triton", "KINEMA_TRITON_URL": triton.grpc_url,
           "KINEMA_MAX_MESSAGE_BYTES": str(4 << 20)}  # fmt: skip
    proc = ServiceProcess("depth", tmp_path_factory.mktemp("depth-service"), **env).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(service):
    with service.channel() as channel:
        yield depth_pb2_grpc.DepthStub(channel)


@pytest.fixture(scope="module")
def local():
    return load_depth_net(WEIGHTS)


def _estimate(stub, images, **fields) -> depth_pb2.EstimateResponse:
    return stub.Estimate(depth_pb2.EstimateRequest(images=tensors.encode(images), **fields), timeout=30)


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str, grpc.RpcError]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    err = info.value
    assert "Traceback" not in (err.details() or "")
    return err.code(), err.details(), err


def test_health_and_reflection(service):
    with service.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert SERVICE in {s.name for s in reply.list_services_response.service}


@pytest.mark.parametrize("size", [(64, 64), (50, 83)])
def test_estimate_matches_in_process(stub, local, size):
    model, sha = local
    images = to_tensor(World().images("test", 0, 3)[0])  # (3, 3, 64, 64) in [-1, 1]
    if size != (64, 64):
        images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)
    r = _estimate(stub, images)
    got = tensors.decode(r.depth, "depth")
    assert got.shape == (3, 1, *size)
    with torch.no_grad():
        want = estimate(model, images).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert r.kind == depth_pb2.DEPTH_KIND_RELATIVE_INVERSE
    assert (r.model.name, r.model.version, r.model.sha256) == ("depth", "1", sha)


def test_batched_images_are_independent(stub):
    images = to_tensor(World().images("test", 10, 4)[0])
    batch = tensors.decode(_estimate(stub, images).depth, "depth")
    for i in (0, 3):
        alone = tensors.decode(_estimate(stub, images[i : i + 1]).depth, "depth")
        np.testing.assert_allclose(alone[0], batch[i], atol=1e-5)


def test_concurrent_requests_are_not_mixed(stub):
    """Triton's dynamic batching may join concurrent requests: each still gets its own maps."""
    images = to_tensor(World().images("test", 20, 6)[0])
    solo = [tensors.decode(_estimate(stub, images[i : i + 1]).depth, "d") for i in range(6)]
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        results[i] = tensors.decode(_estimate(stub, images[i : i + 1]).depth, "d")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        np.testing.assert_allclose(results[i], solo[i], atol=1e-5)


def test_list_models(stub):
    reply = stub.ListModels(depth_pb2.ListModelsRequest(), timeout=10)
    assert reply.default_model == "depth"
    assert [(m.name, m.version) for m in reply.models] == [("depth", "1")] and len(reply.models[0].sha256) == 64
    none = stub.ListModels(depth_pb2.ListModelsRequest(model=common_pb2.ModelRef(name="depth_none")), timeout=10)
    assert list(none.models) == []
    # A version Triton would not take is INVALID_ARGUMENT naming the field (Triton's own text was "details: stol").
    with pytest.raises(grpc.RpcError) as e:
        stub.ListModels(depth_pb2.ListModelsRequest(model=common_pb2.ModelRef(name="depth", version="x1")), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model.version must be a positive integer" in (
        e.value.details())  # fmt: skip


def test_bad_input_gets_a_clear_status_and_the_service_stays_up(stub, service):
    ok = np.zeros((1, 3, 32, 32), np.float32)
    nan = np.full((1, 3, 32, 32), np.nan, np.float32)
    short = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[1, 3, 8, 8], data=b"\0" * 7)
    cases = [
        (depth_pb2.EstimateRequest(images=tensors.encode(np.zeros((1, 4, 32, 32), np.float32))), "INVALID", "(B, 3"),
        (depth_pb2.EstimateRequest(images=tensors.encode(np.zeros((3, 32, 32), np.float32))), "INVALID", "images"),
        (depth_pb2.EstimateRequest(images=tensors.encode(np.zeros((1, 3, 32, 32), np.int32))), "INVALID", "images"),
        (depth_pb2.EstimateRequest(images=tensors.encode(nan)), "INVALID", "NaN"),
        (depth_pb2.EstimateRequest(images=short), "INVALID", "images"),
        (depth_pb2.EstimateRequest(), "INVALID", "images"),
        (depth_pb2.EstimateRequest(images=tensors.encode(np.zeros((1, 3, 0, 32), np.float32))), "INVALID", "images"),
        (depth_pb2.EstimateRequest(images=tensors.encode(np.zeros((1, 3, 8, 1100), np.float32))), "INVALID",
         "1024"),
        (depth_pb2.EstimateRequest(images=tensors.encode(np.zeros((17, 3, 8, 8), np.float32))), "INVALID",
         "limit of 16"),
        # 12 KB that the network would run at 64x65536 (~2 GB, ~10 s): refused before it reaches the network
        (depth_pb2.EstimateRequest(images=tensors.encode(np.zeros((1, 3, 1, 1024), np.float32))), "INVALID",
         "aspect ratio over 16:1"),
        (depth_pb2.EstimateRequest(images=tensors.encode(np.zeros((1, 3, 64, 3), np.float32))), "INVALID",
         "aspect ratio"),
        # 0..255 pixels, or finite values that overflow in the network: a range the caller can act on
        (depth_pb2.EstimateRequest(images=tensors.encode(np.full((1, 3, 8, 8), 255, np.float32))), "INVALID",
         "pixel values must lie in [-1, 1]"),
        (depth_pb2.EstimateRequest(images=tensors.encode(np.full((1, 3, 8, 8), -3e38, np.float32))), "INVALID",
         "up to 3e+38"),
        (depth_pb2.EstimateRequest(images=tensors.encode(ok), model=common_pb2.ModelRef(name="midas")),
         "NOT_FOUND", "midas"),
        (depth_pb2.EstimateRequest(images=tensors.encode(ok), model=common_pb2.ModelRef(name="depth", version="9")),
         "NOT_FOUND", "depth"),
        (depth_pb2.EstimateRequest(images=tensors.encode(ok), model=common_pb2.ModelRef(version="x")),
         "INVALID", "version"),
    ]  # fmt: skip
    for request, code, words in cases:
        got, details, _ = _code(stub.Estimate, request, timeout=30)
        want = grpc.StatusCode.INVALID_ARGUMENT if code == "INVALID" else grpc.StatusCode.NOT_FOUND
        assert got == want, (details, code)
        assert words.lower() in details.lower(), details
    _, _, err = _code(stub.Estimate, cases[0][0], timeout=10)
    detail = parse_error_detail(err.trailing_metadata())
    assert detail is not None and detail.reason == "INVALID_SHAPE" and detail.field == "images"

    big = np.zeros((2, 3, 512, 512), np.float32)  # 6 MiB, over the 4 MiB the service was started with
    got, _, _ = _code(stub.Estimate, depth_pb2.EstimateRequest(images=tensors.encode(big)), timeout=30)
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert service.proc.poll() is None  # still up, still right
    assert tensors.decode(_estimate(stub, ok).depth, "d").shape == (1, 1, 32, 32)
    assert tensors.decode(_estimate(stub, np.zeros((1, 3, 4, 64), np.float32)).depth, "d").shape == (1, 1, 4, 64)


def test_local_backend_serves_the_same_results(stub, tmp_path):
    """KINEMA_BACKEND=local runs the same network in the service process (embedded and development)."""
    local = ServiceProcess("depth", tmp_path, KINEMA_BACKEND="local").start()
    try:
        images = to_tensor(World().images("test", 5, 2)[0])
        with local.channel() as channel:
            got = depth_pb2_grpc.DepthStub(channel).Estimate(
                depth_pb2.EstimateRequest(images=tensors.encode(images)), timeout=30
            )
        want = _estimate(stub, images)
        np.testing.assert_allclose(tensors.decode(got.depth, "d"), tensors.decode(want.depth, "d"), atol=1e-5)
        assert got.model.sha256 == want.model.sha256 and got.model.params_json
    finally:
        local.stop()


def test_remote_depth_equals_local_depth(service, local):
    """RemoteDepth (the DepthEstimator the video pipeline gets in the distributed shape) = LocalDepth, also when it
    splits a batch over several calls (at most `batch` images each)."""
    embedded = LocalDepth(*local)
    images = to_tensor(World().images("test", 30, 5)[0])  # (5, 3, 64, 64)
    with open_channel(service.address) as channel:
        for batch in (16, 2):
            remote = RemoteDepth(channel, batch=batch)
            got = remote.estimate(images)
            assert got.shape == (5, 1, 64, 64)
            torch.testing.assert_close(got, embedded.estimate(images), rtol=0, atol=1e-5)
            assert remote.fingerprint() == embedded.fingerprint()
        assert RemoteDepth(channel).fingerprint() == embedded.fingerprint()  # from ListModels, before any estimate
        with pytest.raises(NotFound):
            RemoteDepth(channel, model="midas").estimate(images[:1])
