"""IIN fitting as a job, over real processes: the session's Triton (explicit model control, tests/conftest.py), a
SeaweedFS S3 server, redis-server, the orchestrator's Celery job worker (threads pool) and the interpret service, all
over loopback gRPC. Training is tiny (a few flow steps on 64 renders): the point is the job's plumbing, and that the
model it loads is the one it stored and answers Analyze and Edit through the interpret service.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import json_format

from kinema.common.v1 import common_pb2
from kinema.interpret.v1 import interpret_pb2 as ipb
from kinema.interpret.v1 import interpret_pb2_grpc as ipb_grpc
from kinema.jobs.celery_app import CeleryWorker
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.orchestration.fitting import FitSpec
from kinema.orchestration.jobs import JobStore
from kinema.rpc import tensors
from kinema.rpc.process import ServiceProcess
from kinema.rpc.status import parse_error_detail
from kinema.storage.artifacts import S3ArtifactStore

from .conftest import jobs_env, start_job_worker

pytestmark = pytest.mark.slow

BUCKET = "kinema-fit"
FITTED = "iin_fit_test"
S = ipb.FittingState
TERMINAL = (S.Value("FITTING_STATE_COMPLETED"), S.Value("FITTING_STATE_FAILED"), S.Value("FITTING_STATE_CANCELLED"))
# 64 renders (the least), 16 components, dims 2 each; eval on 16 test renders (edits decoded on them too).
TINY = {"data": ipb.FactorData(samples=64), "components": 16, "factor_dims": [2, 2, 2, 2], "batch": 16,
        "eval_samples": 16, "seed": 3}  # fmt: skip


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fit-redis")
    with RedisServer(RedisSettings(data_dir=root / "data"), log_path=root / "redis.log") as server:
        yield server


@pytest.fixture(scope="module")
def env(triton, job_s3, redis_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # The worker needs no model service for a fitting; the orchestrator's settings require their addresses.
    addresses = {name: "127.0.0.1:1" for name in ("text_encoder", "denoiser", "autoencoder")}
    work = str(tmp_path_factory.mktemp("fit-work"))
    return jobs_env(addresses, job_s3, redis_server.url, BUCKET, KINEMA_TRITON_URL=triton.grpc_url,
                    KINEMA_BACKEND="triton", KINEMA_DISTILL_DIR=work)  # fmt: skip


@pytest.fixture(scope="module")
def worker(env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    w = start_job_worker(tmp_path_factory.mktemp("fit-worker"), env, concurrency=1)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def service(env, worker, triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    # Fitted models Triton drops are loaded again within a second (KINEMA_MODEL_RESTORE_SECONDS).
    proc = ServiceProcess("interpret", tmp_path_factory.mktemp("fit-jobs-service"), **env,
                          KINEMA_MAX_MESSAGE_BYTES=str(4 << 20), KINEMA_MODEL_RESTORE_SECONDS="1").start()  # fmt: skip
    yield proc
    proc.stop()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:  # the session's Triton serves what tests/services expect again
        for name in (FITTED, "iin_fit_cancelled", "iin_fit_cli"):
            if client.is_model_ready(name):
                client.unload_model(name)
    finally:
        client.close()


@pytest.fixture(scope="module")
def stub(service) -> Iterator[ipb_grpc.InterpretStub]:
    with service.channel() as channel:
        yield ipb_grpc.InterpretStub(channel)


def _fit(stub, **fields) -> ipb.Fitting:
    return stub.Fit(ipb.FitRequest(**fields), timeout=30).fitting


def _get(stub, fitting_id: str) -> ipb.Fitting:
    return stub.GetFitting(ipb.GetFittingRequest(id=fitting_id), timeout=30).fitting


def _refused(call, request) -> tuple[grpc.StatusCode, common_pb2.ErrorDetail | None, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    err = info.value
    assert "Traceback" not in (err.details() or "")
    return err.code(), parse_error_detail(err.trailing_metadata()), err.details()


def _wait(stub, fitting_id: str, timeout: float, until=lambda f: f.state in TERMINAL) -> list[ipb.Fitting]:
    seen, deadline = [], time.monotonic() + timeout
    while True:
        f = _get(stub, fitting_id)
        seen.append(f)
        if until(f):
            return seen
        assert time.monotonic() < deadline, f"fitting {fitting_id} still {S.Name(f.state)} after {timeout} s"
        time.sleep(0.2)


def test_fit_spec_resolves_defaults_and_names_the_field_it_refuses() -> None:
    spec = FitSpec.from_request(ipb.FitRequest())
    assert (spec.kind, spec.representation, spec.samples, spec.components, spec.noise, spec.rho) == (
        "factor", "vector_ae", 8000, 64, 0.3, 0.98)  # fmt: skip
    assert (spec.train_steps, spec.max_seconds, spec.batch, spec.eval_samples, spec.factor_dims) == (
        2000, 1800, 256, 500, ())  # fmt: skip
    assert FitSpec.from_request(ipb.FitRequest(representation="vae")).components == 128
    assert FitSpec.from_request(spec.to_request()) == spec  # a record reads back as it was written
    assert FitSpec.from_request(ipb.FitRequest(noise=0.0)).noise == 0.0  # set to zero is not "unset"
    assert spec.model_name("0123456789abcdef") == "iin_fit_0123456789ab"
    # The service checks requests without importing the trainer (torch): its lists must be the trainer's.
    from kinema.orchestration import fitting
    from kinema.train import iin

    assert set(fitting.KINDS) == set(iin.KINDS) and set(fitting.REPRESENTATIONS) == set(iin.REPRESENTATIONS)
    assert len(iin.FACTORS) == fitting.FACTOR_COUNT


def test_fit_refuses_bad_requests_with_the_field_and_leaves_nothing(stub, redis_server):
    cases = [
        ({"kind": "pca"}, grpc.StatusCode.INVALID_ARGUMENT, "kind"),
        ({"representation": "clip"}, grpc.StatusCode.INVALID_ARGUMENT, "representation"),
        ({"data": ipb.FactorData(samples=10)}, grpc.StatusCode.INVALID_ARGUMENT, "data.samples"),
        ({"data": ipb.FactorData(samples=24_001)}, grpc.StatusCode.INVALID_ARGUMENT, "data.samples"),
        ({"train_steps": 100_001}, grpc.StatusCode.INVALID_ARGUMENT, "train_steps"),
        ({"max_seconds": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "max_seconds"),
        ({"batch": 1}, grpc.StatusCode.INVALID_ARGUMENT, "batch"),
        ({"components": 65}, grpc.StatusCode.INVALID_ARGUMENT, "components"),  # the vector code has 64
        ({"components": 3}, grpc.StatusCode.INVALID_ARGUMENT, "components"),
        (
            {"data": ipb.FactorData(samples=100), "representation": "vae", "components": 128},
            grpc.StatusCode.INVALID_ARGUMENT,
            "components",
        ),  # more components than renders
        ({"factor_dims": [8, 8, 8]}, grpc.StatusCode.INVALID_ARGUMENT, "factor_dims"),
        ({"factor_dims": [16, 16, 16, 16]}, grpc.StatusCode.INVALID_ARGUMENT, "factor_dims"),  # no residual left
        ({"factor_dims": [0, 8, 8, 8]}, grpc.StatusCode.INVALID_ARGUMENT, "factor_dims"),
        ({"kind": "mle", "factor_dims": [8, 8, 8, 8]}, grpc.StatusCode.INVALID_ARGUMENT, "factor_dims"),
        ({"kind": "net2net", "rho": 0.5}, grpc.StatusCode.INVALID_ARGUMENT, "rho"),
        ({"rho": 1.0}, grpc.StatusCode.INVALID_ARGUMENT, "rho"),
        ({"noise": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "noise"),
        ({"noise": -0.1}, grpc.StatusCode.INVALID_ARGUMENT, "noise"),
        ({"seed": 2**31}, grpc.StatusCode.INVALID_ARGUMENT, "seed"),
        ({"eval_samples": 2001}, grpc.StatusCode.INVALID_ARGUMENT, "eval_samples"),
        ({"name": "IIN-x"}, grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ({"name": "vae_decoder"}, grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ({"name": "iin_factor"}, grpc.StatusCode.ALREADY_EXISTS, "name"),  # served already
    ]
    for fields, code, field in cases:
        got, detail, message = _refused(stub.Fit, ipb.FitRequest(**fields))
        assert (got, detail.field if detail else None) == (code, field), (fields, got, message)
        assert field in message or code == grpc.StatusCode.ALREADY_EXISTS, message
    for call, request in ((stub.GetFitting, ipb.GetFittingRequest(id="nope")),
                          (stub.CancelFitting, ipb.CancelFittingRequest(id="nope"))):  # fmt: skip
        assert _refused(call, request)[0] == grpc.StatusCode.NOT_FOUND
    code, detail, _ = _refused(stub.GetFitting, ipb.GetFittingRequest(id="bad id!"))
    assert (code, detail.field) == (grpc.StatusCode.INVALID_ARGUMENT, "id")
    import redis

    keys = redis.Redis.from_url(redis_server.url).keys("kinema-fit:*")
    assert keys == [], keys  # no record, no claim left by a refused start


def test_a_fitting_trains_stores_loads_and_the_service_serves_the_model(stub, job_s3, redis_server, tmp_path: Path):
    started = time.monotonic()
    first = _fit(stub, name=FITTED, train_steps=30, **TINY)
    assert first.state == S.Value("FITTING_STATE_QUEUED") and first.request.name == FITTED
    assert first.representation.name == "vector_ae_encoder" and len(first.representation.sha256) == 64
    resolved = (first.request.kind, first.request.components, list(first.request.factor_dims))
    assert resolved == ("factor", 16, [2, 2, 2, 2])

    # One per name: a second fitting that would load the same name names the first.
    code, detail, message = _refused(stub.Fit, ipb.FitRequest(name=FITTED, **TINY))
    assert code == grpc.StatusCode.ALREADY_EXISTS, message
    assert detail.reason == "FITTING_RUNNING" and detail.metadata["fitting_id"] == first.id
    records = JobStore(redis_server.url, prefix="kinema-fit")
    assert [j.id for j in records.list("default").jobs] == [first.id]  # the refused start left no record
    records.close()

    seen = _wait(stub, first.id, timeout=600)
    done = seen[-1]
    seconds = time.monotonic() - started
    assert done.state == S.Value("FITTING_STATE_COMPLETED"), (done.error, seconds)
    print(f"tiny fitting job: {seconds:.1f} s from Fit to COMPLETED")
    assert {f.state for f in seen} <= {S.Value(f"FITTING_STATE_{n}") for n in ("QUEUED", "RUNNING", "COMPLETED")}
    assert done.progress.step == done.progress.total == 30 and done.attempts == 1
    metrics = json_format.MessageToDict(done.metrics)
    assert metrics["steps_done"] == 30 and metrics["train_seconds"] > 0
    scores = metrics["metrics"]
    assert scores["likelihood"]["invertibility_max_abs_error"] < 1e-4
    assert set(scores["factors"]["linear_probe"]) >= {"residual", "colour", "shape", "position", "size"}
    assert scores["edits"]["set_colour"]["n"] == 16

    # Stored: weights, card and config in the caller's tenant, with the hashes the record names.
    assert [a.media_type for a in done.artifacts] == ["application/vnd.safetensors", "text/markdown", "text/plain"]
    store = S3ArtifactStore(job_s3.endpoint, job_s3.access_key, job_s3.secret_key, BUCKET)
    blobs = [store.get(a.sha256, "default") for a in done.artifacts]
    assert [hashlib.sha256(b).hexdigest() for b in blobs] == [a.sha256 for a in done.artifacts]
    _, card, config = blobs
    model = done.model
    assert model.name == FITTED and model.version == "1" and model.sha256 == done.artifacts[0].sha256
    params = json.loads(model.params_json)
    assert params["factor_names"] == ["colour", "shape", "position", "size"] and params["factor_dims"] == [2] * 4
    assert params["representation"] == "vector_ae" and params["components"] == 16
    card_text = card.decode()
    assert f"| weights_sha256 | {model.sha256} |" in card_text
    assert "kinema.interpret.v1.Interpret/Fit" in card_text and '"train_steps": 30' in card_text  # the command
    assert f'name: "{FITTED}"' in config.decode() and model.sha256 in config.decode()
    provenance = store.stat(done.artifacts[0].sha256, "default").provenance
    assert provenance.pipeline == "interpret_fit" and provenance.models == {
        "representation": first.representation.sha256, "model": model.sha256}  # fmt: skip

    # Loaded: the service lists it and serves it like a shipped model.
    listed = {m.name: m for m in stub.ListModels(ipb.ListModelsRequest(), timeout=30).models}
    assert listed[FITTED] == model and "iin_factor" in listed
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    ref = common_pb2.ModelRef(name=FITTED)
    analyzed = stub.Analyze(ipb.AnalyzeRequest(model=ref, images=tensors.encode(images)), timeout=60)
    assert analyzed.model == model and [f.factor for f in analyzed.factors] == params["factor_names"]
    assert analyzed.autoencoder.name == "vector_ae"
    edited = stub.Edit(ipb.EditRequest(model=ref, images=tensors.encode(images), values={"colour": "blue"}),
                       timeout=60)  # fmt: skip
    assert tensors.decode(edited.images, "images").shape == (2, 3, 64, 64)
    # Factorize / Compose round trip through the fitted flow (its weights are the stored ones).
    code = rng.normal(size=(2, 64)).astype(np.float32)
    f = stub.Factorize(ipb.FactorizeRequest(model=ref, latents=tensors.encode(code)), timeout=60)
    back = stub.Compose(ipb.ComposeRequest(model=ref, factors=f.factors, residual=f.residual, outside=f.outside),
                        timeout=60)  # fmt: skip
    np.testing.assert_allclose(tensors.decode(back.latents, "latents"), code, atol=1e-4)

    # Finished: the name's claim is released, but the name is taken by a served model now.
    code_, detail, _ = _refused(stub.Fit, ipb.FitRequest(name=FITTED, **TINY))
    assert (code_, detail.reason) == (grpc.StatusCode.ALREADY_EXISTS, "MODEL_EXISTS")


def test_cancel_stops_a_running_fitting_and_loads_nothing(stub):
    f = _fit(stub, name="iin_fit_cancelled", train_steps=100_000, max_seconds=600, **TINY)
    running = _wait(stub, f.id, timeout=300, until=lambda x: x.progress.step >= 1 or x.state in TERMINAL)[-1]
    assert running.state == S.Value("FITTING_STATE_RUNNING") and running.progress.total == 100_000
    cancelled = stub.CancelFitting(ipb.CancelFittingRequest(id=f.id), timeout=30).fitting
    assert cancelled.cancel_requested
    asked = time.monotonic()
    done = _wait(stub, f.id, timeout=60)[-1]
    print(f"cancel took effect after {time.monotonic() - asked:.1f} s")
    assert done.state == S.Value("FITTING_STATE_CANCELLED") and not done.artifacts and not done.model.name
    listed = {m.name for m in stub.ListModels(ipb.ListModelsRequest(), timeout=30).models}
    assert "iin_fit_cancelled" not in listed
    assert stub.CancelFitting(ipb.CancelFittingRequest(id=f.id), timeout=30).fitting.state == done.state
    # The name is free again: a new fitting of it is accepted (and cancelled).
    again = _fit(stub, name="iin_fit_cancelled", train_steps=100_000, max_seconds=600, **TINY)
    stub.CancelFitting(ipb.CancelFittingRequest(id=again.id), timeout=30)
    assert _wait(stub, again.id, timeout=120)[-1].state == S.Value("FITTING_STATE_CANCELLED")


def test_a_fitted_model_triton_dropped_is_loaded_again_from_the_store(stub, service, triton):
    """A Triton restart forgets models loaded with their files; unloading one leaves Triton in that state."""
    before = {m.name: m for m in stub.ListModels(ipb.ListModelsRequest(), timeout=30).models}
    assert FITTED in before, "needs the model the fitting test above loaded"
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        client.unload_model(FITTED)
        dropped = time.monotonic()
        while not client.is_model_ready(FITTED):
            assert time.monotonic() - dropped < 60, "the interpret service did not load the stored model again"
            time.sleep(0.2)
    finally:
        client.close()
    print(f"fitted model back in Triton {time.monotonic() - dropped:.1f} s after it was dropped")
    assert '"model restored into Triton"' in service.log.read_text() and FITTED in service.log.read_text()
    after = {m.name: m for m in stub.ListModels(ipb.ListModelsRequest(), timeout=30).models}
    assert after[FITTED] == before[FITTED]


def test_the_cli_fits_through_the_service_and_follows_the_fitting(service, capsys):
    """`kinema interpret fit --wait` queues a fitting and prints it once it ended; `fitting ID` reads it again; a bad
    value is refused naming the option, with nothing queued."""
    from kinema.cli import main

    address = ["--service", service.address]
    assert main(["interpret", "fit", *address, "--samples", "64", "--components", "16", "--factor-dims", "2", "2",
                 "2", "2", "--batch", "16", "--steps", "5", "--eval-samples", "16", "--name", "iin_fit_cli",
                 "--wait", "--json"]) == 0  # fmt: skip
    fitting = json.loads(capsys.readouterr().out)
    assert fitting["state"] == "FITTING_STATE_COMPLETED" and fitting["model"]["name"] == "iin_fit_cli"
    assert main(["interpret", "fitting", fitting["id"], *address]) == 0
    out = capsys.readouterr().out
    assert f"fitting {fitting['id']}: COMPLETED" in out and "model iin_fit_cli version 1" in out
    assert "factor probes (z block -> its factor): colour" in out
    assert main(["interpret", "fit", *address, "--samples", "10"]) == 2
    assert "--samples: must be in 64..24000" in capsys.readouterr().err
    assert main(["interpret", "fitting", "nope", *address]) != 0
