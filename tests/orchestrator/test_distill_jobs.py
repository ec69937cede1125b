"""Distillation as a job, over real processes: the session's Triton (explicit model control, tests/conftest.py), a
SeaweedFS S3 server, redis-server, the orchestrator's Celery job worker (threads pool) and the distill service, all
over loopback gRPC. Training is tiny (a few LADD iterations on 4 teacher latents, batch 4): the point is the job's
plumbing and that the student it loads is the one it stored, served through the distill service's Sample.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import tritonclient.grpc as grpcclient

from kinema.common.v1 import common_pb2
from kinema.distill.v1 import distill_pb2 as dpb
from kinema.distill.v1 import distill_pb2_grpc as dpb_grpc
from kinema.inference.runner import TritonRunner
from kinema.jobs.celery_app import CeleryWorker
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.nn.text import TextEmbedding
from kinema.orchestration.distillation import STUDENTS_KEY, DistillationSpec, DistillJobs, record_request
from kinema.orchestration.jobs import JobStore
from kinema.orchestration.model_jobs import ModelClaims, ModelJobSettings, ModelRestorer, loaded_entry
from kinema.pipelines.local import LocalStudent
from kinema.pipelines.student import StudentFacts
from kinema.repository import default_models_dir, load_denoiser
from kinema.rpc import tensors
from kinema.rpc.process import ServiceProcess
from kinema.rpc.status import parse_error_detail
from kinema.sampling.samplers import initial_noise
from kinema.storage.artifacts import S3ArtifactStore

from .conftest import jobs_env, start_job_worker

pytestmark = pytest.mark.slow

BUCKET = "kinema-distill"
STUDENT = "denoiser_ladd_test"
S = dpb.DistillationState
TERMINAL = (S.Value("DISTILLATION_STATE_COMPLETED"), S.Value("DISTILLATION_STATE_FAILED"),
            S.Value("DISTILLATION_STATE_CANCELLED"))  # fmt: skip
TINY = {"student_steps": 2, "teacher_samples": 4, "batch": 4, "seed": 5}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("distill-redis")
    with RedisServer(RedisSettings(data_dir=root / "data"), log_path=root / "redis.log") as server:
        yield server


@pytest.fixture(scope="module")
def env(triton, job_s3, redis_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # The worker needs no model service for a distillation; the orchestrator's settings require their addresses.
    addresses = {name: "127.0.0.1:1" for name in ("text_encoder", "denoiser", "autoencoder")}
    work = str(tmp_path_factory.mktemp("distill-work"))
    return jobs_env(addresses, job_s3, redis_server.url, BUCKET, KINEMA_TRITON_URL=triton.grpc_url,
                    KINEMA_BACKEND="triton", KINEMA_DISTILL_DIR=work)  # fmt: skip


@pytest.fixture(scope="module")
def worker(env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    w = start_job_worker(tmp_path_factory.mktemp("distill-worker"), env, concurrency=1)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def service(env, worker, triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    # Students Triton drops are loaded again within a second (KINEMA_STUDENT_RESTORE_SECONDS).
    proc = ServiceProcess("distill", tmp_path_factory.mktemp("distill-jobs-service"), **env,
                          KINEMA_MAX_MESSAGE_BYTES=str(4 << 20),
                          KINEMA_STUDENT_RESTORE_SECONDS="1").start()  # fmt: skip
    yield proc
    proc.stop()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:  # the session's Triton serves what tests/services expect again
        if client.is_model_ready(STUDENT):
            client.unload_model(STUDENT)
    finally:
        client.close()


@pytest.fixture(scope="module")
def stub(service) -> Iterator[dpb_grpc.DistillStub]:
    with service.channel() as channel:
        yield dpb_grpc.DistillStub(channel)


def _cond(g: torch.Generator, rows: int) -> TextEmbedding:
    return TextEmbedding(torch.randn(rows, 8, 384, generator=g), torch.ones(rows, 8, dtype=torch.bool),
                         torch.randn(rows, 384, generator=g), [False] * rows)  # fmt: skip


def _wire(g: torch.Generator, rows: int):
    from kinema.denoiser.v1 import denoiser_pb2

    cond = _cond(g, rows)
    return denoiser_pb2.Conditioning(tokens=tensors.encode(cond.tokens), mask=tensors.encode(cond.mask),
                                     pooled=tensors.encode(cond.pooled))  # fmt: skip


def _start(stub, **fields) -> dpb.Distillation:
    return stub.StartDistillation(dpb.StartDistillationRequest(**fields), timeout=30).distillation


def _get(stub, distillation_id: str) -> dpb.Distillation:
    return stub.GetDistillation(dpb.GetDistillationRequest(id=distillation_id), timeout=30).distillation


def _refused(call, request) -> tuple[grpc.StatusCode, common_pb2.ErrorDetail | None, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    err = info.value
    assert "Traceback" not in (err.details() or "")
    return err.code(), parse_error_detail(err.trailing_metadata()), err.details()


def _wait(stub, distillation_id: str, timeout: float, until=lambda d: d.state in TERMINAL) -> list[dpb.Distillation]:
    seen, deadline = [], time.monotonic() + timeout
    while True:
        d = _get(stub, distillation_id)
        seen.append(d)
        if until(d):
            return seen
        assert time.monotonic() < deadline, f"distillation {distillation_id} still {S.Name(d.state)} after {timeout} s"
        time.sleep(0.2)


def test_bad_input_is_refused_with_the_field_and_records_nothing(stub, redis_server):
    cases = [
        ({"teacher": common_pb2.ModelRef(name="denoiser_nope")}, grpc.StatusCode.NOT_FOUND, "teacher.name"),
        ({"teacher": common_pb2.ModelRef(name="depth")}, grpc.StatusCode.NOT_FOUND, "teacher.name"),
        ({"teacher": common_pb2.ModelRef(name="denoiser_4step")}, grpc.StatusCode.NOT_FOUND, "teacher.name"),  # student
        ({"teacher": common_pb2.ModelRef(name="denoiser", version="7")}, grpc.StatusCode.NOT_FOUND, "teacher.name"),
        ({"student_steps": 9}, grpc.StatusCode.INVALID_ARGUMENT, "student_steps"),
        ({"train_steps": 100_001}, grpc.StatusCode.INVALID_ARGUMENT, "train_steps"),
        ({"train_steps": -1}, grpc.StatusCode.INVALID_ARGUMENT, "train_steps"),
        ({"max_seconds": -1}, grpc.StatusCode.INVALID_ARGUMENT, "max_seconds"),
        ({"max_seconds": 1e9}, grpc.StatusCode.INVALID_ARGUMENT, "max_seconds"),
        ({"max_seconds": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "max_seconds"),
        ({"teacher_samples": 8193}, grpc.StatusCode.INVALID_ARGUMENT, "teacher_samples"),
        ({"batch": 257}, grpc.StatusCode.INVALID_ARGUMENT, "batch"),
        ({"eval_prompts": 1001}, grpc.StatusCode.INVALID_ARGUMENT, "eval_prompts"),
        ({"name": "Denoiser-x"}, grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ({"name": "vae_decoder"}, grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ({"name": "denoiser_4step"}, grpc.StatusCode.ALREADY_EXISTS, "name"),  # served already
    ]
    for fields, code, field in cases:
        got, detail, message = _refused(stub.StartDistillation, dpb.StartDistillationRequest(**fields))
        assert (got, detail.field if detail else None) == (code, field), (fields, got, message)
    code, _, _ = _refused(stub.GetDistillation, dpb.GetDistillationRequest(id="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, detail, _ = _refused(stub.GetDistillation, dpb.GetDistillationRequest(id="bad id!"))
    assert (code, detail.field) == (grpc.StatusCode.INVALID_ARGUMENT, "id")
    code, _, _ = _refused(stub.CancelDistillation, dpb.CancelDistillationRequest(id="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    import redis

    keys = redis.Redis.from_url(redis_server.url).keys("kinema-distill:*")
    assert keys == [], keys  # no record, no claim left by a refused start


def test_a_claim_held_by_an_ended_or_vanished_distillation_is_taken_over(redis_server):
    store = JobStore(redis_server.url, prefix="kinema-claims-test")
    claims = ModelClaims(store)
    teacher = common_pb2.ModelInfo(name="denoiser", version="1", sha256="b" * 64)
    record = record_request(DistillationSpec.from_request(dpb.StartDistillationRequest()), teacher)
    a, b, c = (store.create("default", record)[0] for _ in range(3))
    assert claims.claim(teacher, "default", a.id, 60) == ""
    assert claims.claim(teacher, "default", b.id, 60) == a.id  # a is live (QUEUED)
    store.request_cancel("default", a.id)  # a ended: its claim is stale
    assert claims.claim(teacher, "default", b.id, 60) == ""
    store.delete("default", b.id)  # b's record vanished (expired): stale too
    assert claims.claim(teacher, "default", c.id, 60) == ""
    claims.release(teacher, "default", a.id)  # only the holder releases
    assert store.redis.get(claims.key(teacher)) == f"default:{c.id}"
    claims.release(teacher, "default", c.id)
    assert store.redis.get(claims.key(teacher)) is None
    unpinned = common_pb2.ModelInfo(name="denoiser_tiny")  # a config that pins no weights hash: claimed by name
    assert claims.key(unpinned).endswith(":running:name:denoiser_tiny")
    store.close()


def test_a_distillation_trains_stores_loads_and_the_service_serves_the_student(
    stub, job_s3, redis_server, tmp_path: Path
):
    started = time.monotonic()
    first = _start(stub, train_steps=3, max_seconds=120, eval_prompts=4, name=STUDENT, **TINY)
    assert first.state == S.Value("DISTILLATION_STATE_QUEUED") and first.request.name == STUDENT
    assert first.teacher.name == "denoiser" and first.teacher.version == "1" and len(first.teacher.sha256) == 64
    assert (first.request.train_steps, first.request.student_steps, first.request.max_seconds) == (3, 2, 120)

    # One per teacher: a second start while the first is queued or running names the first.
    code, detail, message = _refused(stub.StartDistillation, dpb.StartDistillationRequest(train_steps=1, **TINY))
    assert code == grpc.StatusCode.ALREADY_EXISTS, message
    assert detail.reason == "DISTILLATION_RUNNING" and detail.metadata["distillation_id"] == first.id
    records = JobStore(redis_server.url, prefix="kinema-distill")
    assert [j.id for j in records.list("default").jobs] == [first.id]  # the refused start left no record
    records.close()

    seen = _wait(stub, first.id, timeout=600)
    done = seen[-1]
    seconds = time.monotonic() - started
    assert done.state == S.Value("DISTILLATION_STATE_COMPLETED"), (done.error, seconds)
    print(f"tiny distillation job: {seconds:.1f} s from start to COMPLETED")
    states = [d.state for d in seen]
    assert set(states) <= {S.Value(f"DISTILLATION_STATE_{n}") for n in ("QUEUED", "RUNNING", "COMPLETED")}
    assert done.progress.step == done.progress.total == 3 and done.attempts == 1
    assert done.metrics["steps_done"] == 3 and done.metrics["samples_seen"] == 12 and done.metrics["train_seconds"] > 0
    assert set(done.metrics["last_losses"]) >= {"g_adv", "d_loss"}
    probe = done.metrics["probe"]
    assert probe["n"] == 4 and set(probe) == {"n", "1_steps", "2_steps"}
    assert 0 <= probe["2_steps"]["colour"] <= 1

    # Stored: weights, card and config in the caller's tenant, with the hashes the record names.
    assert [a.media_type for a in done.artifacts] == ["application/vnd.safetensors", "text/markdown", "text/plain"]
    store = S3ArtifactStore(job_s3.endpoint, job_s3.access_key, job_s3.secret_key, BUCKET)
    blobs = [store.get(a.sha256, "default") for a in done.artifacts]
    assert [hashlib.sha256(b).hexdigest() for b in blobs] == [a.sha256 for a in done.artifacts]
    weights, card, config = blobs
    student = done.student
    assert student.name == STUDENT and student.version == "1" and student.sha256 == done.artifacts[0].sha256
    assert json.loads(student.params_json) == {"student_steps": 2, "timesteps": [1.0, 0.5], "teacher": "denoiser",
                                               "teacher_sha256": first.teacher.sha256}  # fmt: skip
    assert f"| weights_sha256 | {student.sha256} |" in card.decode()
    text = config.decode()
    for line in (f'name: "{STUDENT}"', f'string_value: "{student.sha256}"', 'key: "student_steps"',
                 f'string_value: "{first.teacher.sha256}"'):  # fmt: skip
        assert line in text, line
    provenance = store.stat(done.artifacts[0].sha256, "default").provenance
    assert provenance.pipeline == "distill" and provenance.models == {"teacher": first.teacher.sha256,
                                                                      "student": student.sha256}  # fmt: skip

    # Loaded: the service lists it and serves it; its latents are the stored weights' (embedded sampler, 1e-5).
    listed = {m.name: m for m in stub.ListModels(dpb.ListModelsRequest(), timeout=30).models}
    assert listed[STUDENT] == student  # what the distillation reports is what the service lists
    g = torch.Generator().manual_seed(0)
    cond = _cond(g, 2)
    noise = torch.cat([initial_noise((1, 4, 16, 16), 100 + i) for i in range(2)])
    wire = _wire(torch.Generator().manual_seed(0), 2)
    request = dpb.SampleRequest(model=common_pb2.ModelRef(name=STUDENT), noise=tensors.encode(noise), cond=wire,
                                seed=3)  # fmt: skip
    events = list(stub.Sample(request, timeout=120))
    assert [e.progress.step for e in events[:-1]] == [1, 2]
    result = events[-1].result
    assert result.model.name == STUDENT and result.model.sha256 == student.sha256 and list(result.timesteps) == [1, 0.5]
    (tmp_path / "student.safetensors").write_bytes(weights)
    model, sha = load_denoiser(default_models_dir(), path=tmp_path / "student.safetensors")
    embedded = LocalStudent(model, sha, StudentFacts(2, "denoiser", first.teacher.sha256))
    expected = embedded.sample_few(noise, cond, None, timesteps=[1.0, 0.5], seed=3)
    got = torch.from_numpy(tensors.decode(result.latents, "latents", writable=True))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()

    # Finished: the teacher is free again.
    again = _start(stub, train_steps=100_000, max_seconds=600, **TINY)
    stub.CancelDistillation(dpb.CancelDistillationRequest(id=again.id), timeout=30)
    _wait(stub, again.id, timeout=120)


def test_cancel_stops_a_running_distillation_and_frees_the_teacher(stub, job_s3):
    d = _start(stub, train_steps=100_000, max_seconds=600, name="denoiser_ladd_cancelled", **TINY)
    running = _wait(stub, d.id, timeout=300, until=lambda x: x.progress.step >= 1 or x.state in TERMINAL)[-1]
    assert running.state == S.Value("DISTILLATION_STATE_RUNNING") and running.progress.total == 100_000
    cancelled = stub.CancelDistillation(dpb.CancelDistillationRequest(id=d.id), timeout=30).distillation
    assert cancelled.cancel_requested
    asked = time.monotonic()
    done = _wait(stub, d.id, timeout=60)[-1]
    print(f"cancel took effect after {time.monotonic() - asked:.1f} s")
    assert done.state == S.Value("DISTILLATION_STATE_CANCELLED") and not done.artifacts and not done.student.name
    listed = {m.name for m in stub.ListModels(dpb.ListModelsRequest(), timeout=30).models}
    assert "denoiser_ladd_cancelled" not in listed
    # Cancelling again changes nothing; the teacher is free: a new start is accepted (and cancelled while queued
    # or running).
    assert stub.CancelDistillation(dpb.CancelDistillationRequest(id=d.id), timeout=30).distillation.state == done.state
    nxt = _start(stub, train_steps=100_000, max_seconds=600, **TINY)
    stub.CancelDistillation(dpb.CancelDistillationRequest(id=nxt.id), timeout=30)
    assert _wait(stub, nxt.id, timeout=120)[-1].state == S.Value("DISTILLATION_STATE_CANCELLED")


def test_a_student_triton_dropped_is_loaded_again_from_the_store(stub, service, triton):
    """A Triton restart forgets students loaded with their files; unloading one leaves Triton in that state."""
    before = {m.name: m for m in stub.ListModels(dpb.ListModelsRequest(), timeout=30).models}
    assert STUDENT in before, "needs the student the distillation test above loaded"
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        client.unload_model(STUDENT)
        dropped = time.monotonic()
        while not client.is_model_ready(STUDENT):
            assert time.monotonic() - dropped < 60, "the distill service did not load the stored student again"
            time.sleep(0.2)
    finally:
        client.close()
    print(f"student back in Triton {time.monotonic() - dropped:.1f} s after it was dropped")
    assert "model restored into Triton" in service.log.read_text()
    after = {m.name: m for m in stub.ListModels(dpb.ListModelsRequest(), timeout=30).models}
    assert after[STUDENT] == before[STUDENT]  # the same weights, version and schedule
    noise = tensors.encode(initial_noise((1, 4, 16, 16), 7))
    request = dpb.SampleRequest(model=common_pb2.ModelRef(name=STUDENT), noise=noise,
                                cond=_wire(torch.Generator().manual_seed(1), 1), seed=1)  # fmt: skip
    assert list(stub.Sample(request, timeout=120))[-1].result.model.sha256 == before[STUDENT].sha256


def test_a_restore_skips_a_recorded_student_whose_artifacts_are_gone(triton, job_s3, redis_server):
    jobs = DistillJobs(ModelJobSettings(redis_url=redis_server.url))
    gone = {kind: "0" * 64 for kind in ("weights", "card", "config")}
    entry = loaded_entry("default", "x", gone, "pass\n", "1/mmdit.safetensors")
    jobs.store.redis.hset(STUDENTS_KEY, "denoiser_ladd_gone", entry)
    runner = TritonRunner(triton.grpc_url)
    store = S3ArtifactStore(job_s3.endpoint, job_s3.access_key, job_s3.secret_key, BUCKET)
    try:
        assert ModelRestorer(jobs.store, STUDENTS_KEY, runner, store).restore() == []  # logged and left
        assert not runner.ready("denoiser_ladd_gone")
    finally:
        jobs.store.redis.hdel(STUDENTS_KEY, "denoiser_ladd_gone")
        runner.close()
        jobs.close()
