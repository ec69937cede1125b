"""The interpret service over real gRPC: in-process networks (KINEMA_BACKEND=local) for behaviour and bad input,
and the real Triton of tests/conftest.py (its `triton` fixture) for the same answers through Triton.

Images are single-object renders of the test split with known factors (`kinema.train.iin`), 64x64 as the shipped
IIN interprets them.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kinema.common.v1 import common_pb2
from kinema.data.scene import COLOUR_NAMES
from kinema.interpret.v1 import interpret_pb2 as pb
from kinema.interpret.v1 import interpret_pb2_grpc as pb_grpc
from kinema.rpc import tensors
from kinema.rpc.process import ServiceProcess
from kinema.rpc.status import parse_error_detail
from kinema.train.autoencoder import to_tensor
from kinema.train.iin import render_single_objects

pytestmark = pytest.mark.slow

SERVICE = "kinema.interpret.v1.Interpret"
FACTORS = ["colour", "shape", "position", "size"]
N = 12


@pytest.fixture(scope="module")
def renders():
    """(images (N, 3, 64, 64) in [-1, 1], colour names) of the first test-split single-object scenes."""
    raw = render_single_objects("test", 0, N)
    return to_tensor(raw["images"]).numpy(), [COLOUR_NAMES[c] for c in raw["colour"]]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    proc = ServiceProcess("interpret", tmp_path_factory.mktemp("interpret-local"), KINEMA_BACKEND="local").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(service):
    with service.channel() as channel:
        yield pb_grpc.InterpretStub(channel)


def _ref(name: str = "", version: str = "") -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name, version=version)


def _analyze(stub, images, **fields) -> pb.AnalyzeResponse:
    return stub.Analyze(pb.AnalyzeRequest(images=tensors.encode(images), **fields), timeout=60)


def _colours(reply: pb.AnalyzeResponse) -> list[str]:
    (colour,) = [f for f in reply.factors if f.factor == "colour"]
    return list(colour.best)


def _code(call, request) -> tuple[grpc.StatusCode, str, grpc.RpcError]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    err = info.value
    assert "Traceback" not in (err.details() or "")
    return err.code(), err.details(), err


def test_health_and_reflection_list_the_service(service):
    with service.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert SERVICE in {s.name for s in reply.list_services_response.service}


def test_analyze_reads_the_colour_of_rendered_objects(stub, renders):
    images, truth = renders
    reply = _analyze(stub, images)
    assert [f.factor for f in reply.factors] == FACTORS
    colour = reply.factors[0]
    assert list(colour.values) == list(COLOUR_NAMES)
    scores = tensors.decode(colour.scores, "scores")
    assert scores.shape == (N, 6) and np.allclose(scores.sum(1), 1.0, atol=1e-5)
    assert list(colour.best) == [COLOUR_NAMES[i] for i in scores.argmax(1)]
    right = sum(a == b for a, b in zip(colour.best, truth, strict=True))
    assert right >= N - 1, (list(colour.best), truth)  # z_colour reads colour in 97.8% of test renders
    assert (reply.model.name, reply.model.version) == ("iin_factor", "1") and len(reply.model.sha256) == 64
    assert reply.autoencoder.name == "vector_ae" and len(reply.autoencoder.sha256) == 64


def test_edit_sets_the_colour_as_analyze_reads_it(stub, renders):
    images, truth = renders
    pick = [i for i, c in enumerate(truth) if c != "blue"][:6]
    reply = stub.Edit(pb.EditRequest(images=tensors.encode(images[pick]), values={"colour": "blue"}), timeout=60)
    edited = tensors.decode(reply.images, "images")
    assert edited.shape == (len(pick), 3, 64, 64) and edited.min() >= -1 and edited.max() <= 1
    assert np.abs(edited - images[pick]).mean() > 0.01  # it changed the images
    now = _colours(_analyze(stub, edited))
    assert sum(c == "blue" for c in now) >= len(pick) - 1, now
    assert reply.model.name == "iin_factor" and reply.autoencoder.name == "vector_ae"


def test_factorize_compose_and_traverse_latents(stub, renders):
    # iin_factor interprets the vector autoencoder's 64-d code of an image (codes of three renders here: far off
    # them, e.g. N(0, I) codes, the flow saturates and does not invert); its basis keeps all 64 components, so what
    # lies outside them is float rounding and Compose is exact with or without it.
    from kinema.repository import default_models_dir
    from kinema.train.vector_ae import load_vector_autoencoder

    latents = load_vector_autoencoder(default_models_dir()).encode(torch.from_numpy(renders[0][:3])).numpy()
    f = stub.Factorize(pb.FactorizeRequest(latents=tensors.encode(latents)), timeout=60)
    assert list(f.factor_names) == FACTORS
    factors, residual = tensors.decode(f.factors, "f"), tensors.decode(f.residual, "r")
    outside = tensors.decode(f.outside, "o")
    assert factors.shape == (3, 4, 8) and residual.shape == (3, 32) and outside.shape == (3, 64)
    assert np.abs(outside).max() < 1e-3
    exact = stub.Compose(pb.ComposeRequest(factors=f.factors, residual=f.residual, outside=f.outside), timeout=60)
    np.testing.assert_allclose(tensors.decode(exact.latents, "l"), latents, atol=1e-4)
    without = stub.Compose(pb.ComposeRequest(factors=f.factors, residual=f.residual), timeout=60)
    np.testing.assert_allclose(tensors.decode(without.latents, "l"), latents, atol=1e-3)

    shift = np.ones(8, np.float32)
    t = stub.Traverse(pb.TraverseRequest(latents=tensors.encode(latents), factor="shape", value=tensors.encode(shift),
                                         mode=pb.TRAVERSE_MODE_SHIFT, scales=[0.0, 2.0]), timeout=60)  # fmt: skip
    out = tensors.decode(t.latents, "l")
    assert out.shape == (3, 2, 64)
    np.testing.assert_allclose(out[:, 0], latents, atol=1e-4)  # scale 0: nothing moves
    moved = stub.Factorize(pb.FactorizeRequest(latents=tensors.encode(out[:, 1])), timeout=60)
    # z_shape moved 2 units off the data: the round trip through T^-1 and T holds to ~1e-2 there (8e-3 seen)
    np.testing.assert_allclose(tensors.decode(moved.factors, "f")[:, 1], factors[:, 1] + 2, atol=2e-2)
    np.testing.assert_allclose(tensors.decode(moved.factors, "f")[:, 0], factors[:, 0], atol=2e-2)


def test_translate_draws_target_latents_from_source_representations(stub):
    source = np.random.default_rng(1).standard_normal((3, 384)).astype(np.float32)

    def translate(src, **fields) -> pb.TranslateResponse:
        request = pb.TranslateRequest(model=_ref("iin_net2net"), source=tensors.encode(src), **fields)
        return stub.Translate(request, timeout=60)

    r = translate(source, seed=7, decode=True)
    latents, images = tensors.decode(r.latents, "l"), tensors.decode(r.images, "i")
    assert latents.shape == (3, 64) and images.shape == (3, 3, 64, 64)
    assert r.model.name == "iin_net2net" and r.autoencoder.name == "vector_ae"
    alone = tensors.decode(translate(source[2:], seed=9).latents, "l")  # item b draws from seed + b alone
    np.testing.assert_allclose(alone[0], latents[2], rtol=1e-3, atol=1e-3)  # batched float rounding, through T^-1
    assert not translate(source, seed=7).HasField("images")
    cold = [tensors.decode(translate(source, seed=s, temperature=0.0).latents, "l") for s in (1, 2)]
    np.testing.assert_allclose(cold[0], cold[1], atol=1e-6)  # temperature 0: z = 0 whatever the seed


def test_list_models_publishes_the_factor_layout(stub):
    import json

    reply = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert reply.default_model == "iin_factor"
    assert [m.name for m in reply.models] == ["iin_factor", "iin_invariance", "iin_net2net"]
    params = json.loads(reply.models[0].params_json)
    assert params["factor_names"] == FACTORS and params["factor_values"][0] == list(COLOUR_NAMES)
    assert list(stub.ListModels(pb.ListModelsRequest(model=_ref("iin_none")), timeout=30).models) == []


def test_every_bad_input_gets_its_code_and_the_service_stays_up(stub, service, renders):
    images = renders[0][:1]
    ok = tensors.encode(images)
    invalid, not_found, precondition = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                        grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    short = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[1, 3, 64, 64], data=b"\0" * 7)
    small = tensors.encode(np.zeros((1, 3, 32, 32), np.float32))
    latents = tensors.encode(np.zeros((1, 64), np.float32))  # the vector autoencoder's code, as every IIN's
    zeros8 = tensors.encode(np.zeros(8, np.float32))
    cases = [
        (stub.Edit, pb.EditRequest(images=ok, values={"hue": "blue"}), invalid, "colour, shape, position, size"),
        (stub.Edit, pb.EditRequest(images=ok, values={"colour": "pink"}), invalid,
         "red, yellow, green, cyan, blue, purple"),
        (stub.Edit, pb.EditRequest(images=ok), invalid, "at least one"),
        (stub.Analyze, pb.AnalyzeRequest(images=small), invalid, "64x64"),
        (stub.Edit, pb.EditRequest(images=small, values={"colour": "blue"}), invalid, "64x64"),
        (stub.Analyze, pb.AnalyzeRequest(images=short), invalid, "bytes"),
        (stub.Analyze, pb.AnalyzeRequest(images=tensors.encode(np.full((1, 3, 64, 64), np.nan, np.float32))),
         invalid, "NaN"),
        (stub.Analyze, pb.AnalyzeRequest(), invalid, "images"),
        (stub.Analyze, pb.AnalyzeRequest(images=ok, model=_ref("midas")), not_found, "midas"),
        (stub.Analyze, pb.AnalyzeRequest(images=ok, model=_ref("iin_missing")), not_found, "iin_missing"),
        (stub.Analyze, pb.AnalyzeRequest(images=ok, model=_ref("iin_factor", "9")), not_found, "9"),
        (stub.Analyze, pb.AnalyzeRequest(images=ok, model=_ref("iin_net2net")), precondition, "Translate"),
        (stub.Edit, pb.EditRequest(images=ok, values={"colour": "blue"}, model=_ref("iin_invariance")),
         precondition, "named values"),
        (stub.Translate, pb.TranslateRequest(source=tensors.encode(np.zeros((1, 384), np.float32))), precondition,
         "not conditional"),
        (stub.Translate, pb.TranslateRequest(model=_ref("iin_net2net"),
                                             source=tensors.encode(np.zeros((1, 10), np.float32))), invalid, "384"),
        (stub.Factorize, pb.FactorizeRequest(latents=latents, model=_ref("iin_net2net")), precondition, "Translate"),
        (stub.Factorize, pb.FactorizeRequest(latents=tensors.encode(np.zeros((1, 4, 16, 16), np.float32))), invalid,
         "expected shape [1, 64]"),
        (stub.Traverse, pb.TraverseRequest(latents=latents, factor="colour", value=zeros8), invalid, "mode"),
        (stub.Traverse, pb.TraverseRequest(latents=latents, factor="hue", mode=pb.TRAVERSE_MODE_SET,
                                           value=zeros8), invalid, "colour, shape"),
        (stub.Traverse, pb.TraverseRequest(latents=latents, factor="colour", mode=pb.TRAVERSE_MODE_SET,
                                           value=tensors.encode(np.zeros(3, np.float32))), invalid, "8 dims"),
    ]  # fmt: skip
    for call, request, code, words in cases:
        got, details, _ = _code(call, request)
        assert got == code, (details, request)
        assert words.lower() in details.lower(), details
    _, _, err = _code(stub.Edit, cases[1][1])
    detail = parse_error_detail(err.trailing_metadata())
    assert detail is not None and (detail.reason, detail.field) == ("UNKNOWN_VALUE", "values")
    assert service.proc.poll() is None  # still up, still right
    assert len(_analyze(stub, images).factors) == 4


@pytest.mark.parametrize("method", ["Analyze", "Edit", "Factorize", "Compose", "Traverse", "Translate", "ListModels"])
def test_malformed_requests_never_get_an_internal_error(stub, service, method):
    """A sample of tests/services/test_fuzz.py's fuzzing for each RPC: OK or a defined status, never INTERNAL."""
    from hypothesis import HealthCheck, given, settings

    from kinema.testing.fuzz import FORBIDDEN, classify, messages

    call = getattr(stub, method)
    request_type = getattr(pb, f"{method}Request")

    @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(messages(request_type))
    def one(request) -> None:
        code = classify(lambda: call(request, timeout=60))
        assert code not in FORBIDDEN, (code, str(request)[:500])

    one()
    assert service.proc.poll() is None


def test_the_cli_runs_through_the_service(service, renders, tmp_path, capsys):
    from PIL import Image

    from kinema.cli import main

    images, truth = renders
    path = tmp_path / "render.png"
    Image.fromarray(((images[0].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)).save(path)
    assert main(["interpret", "analyze", str(path), "--service", service.address]) == 0
    assert f"colour    {truth[0]}" in capsys.readouterr().out
    out = tmp_path / "blue.png"
    assert main(["interpret", "edit", str(path), "--set", "colour=blue", "-o", str(out), "--service",
                 service.address]) == 0  # fmt: skip
    assert main(["interpret", "analyze", str(out), "--service", service.address]) == 0
    assert "colour    blue" in capsys.readouterr().out
    assert main(["interpret", "edit", str(path), "--set", "colour=pink", "--service", service.address]) == 2
    assert "one of: red, yellow" in capsys.readouterr().err


# -- the same answers through a real Triton -----------------------------------------------------------


@pytest.fixture(scope="module")
def triton_service(triton, tmp_path_factory):
    """The session's Triton loads the models the chart and stack serve (kinema.rpc.process.SERVED_MODELS): the iin_*
    models and the autoencoder they name (vector_ae_encoder / _decoder) among them."""
    env = {"KINEMA_BACKEND": "triton", "KINEMA_TRITON_URL": triton.grpc_url}
    proc = ServiceProcess("interpret", tmp_path_factory.mktemp("interpret-triton"), **env).start()
    yield proc
    proc.stop()


def test_triton_serves_the_same_answers(triton_service, stub, renders):
    images = renders[0][:4]
    with triton_service.channel() as channel:
        served = pb_grpc.InterpretStub(channel)
        a, want = _analyze(served, images), _analyze(stub, images)
        for got, ref in zip(a.factors, want.factors, strict=True):
            np.testing.assert_allclose(tensors.decode(got.scores, "s"), tensors.decode(ref.scores, "s"), atol=1e-5)
        assert (a.model.sha256, a.autoencoder.sha256) == (want.model.sha256, want.autoencoder.sha256)
        edit = pb.EditRequest(images=tensors.encode(images), values={"colour": "red", "size": "large"})
        np.testing.assert_allclose(tensors.decode(served.Edit(edit, timeout=60).images, "i"),
                                   tensors.decode(stub.Edit(edit, timeout=60).images, "i"), atol=1e-4)  # fmt: skip
        source = tensors.encode(np.random.default_rng(2).standard_normal((2, 384)).astype(np.float32))
        translate = pb.TranslateRequest(model=_ref("iin_net2net"), source=source, seed=3)
        got, want = (tensors.decode(s.Translate(translate, timeout=60).latents, "l") for s in (served, stub))
        np.testing.assert_allclose(got, want, atol=1e-4)
        probe = tensors.encode(np.random.default_rng(4).standard_normal((2, 70)).astype(np.float32))
        invariance = pb.TranslateRequest(model=_ref("iin_invariance"), source=probe, seed=5)
        got, want = (tensors.decode(s.Translate(invariance, timeout=60).latents, "l") for s in (served, stub))
        np.testing.assert_allclose(got, want, atol=1e-4)
        listed = served.ListModels(pb.ListModelsRequest(), timeout=30)
        assert [m.name for m in listed.models] == ["iin_factor", "iin_invariance", "iin_net2net"]
        assert '"factor_names": ["colour"' in listed.models[0].params_json  # published by its config under Triton
        got, details, _ = _code(served.Analyze, pb.AnalyzeRequest(images=tensors.encode(images),
                                                                  model=_ref("iin_missing")))  # fmt: skip
        assert got == grpc.StatusCode.NOT_FOUND, details  # not in this Triton
