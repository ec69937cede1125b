"""`KinemaClient` end to end over real processes (tests/client/conftest.py): Generate with progress, verified
downloads from the real S3 server (and a tampered object caught), jobs, catalogues and domain errors."""

from __future__ import annotations

import hashlib
import io

import pytest
from minio import Minio
from PIL import Image

from kinema.client import KinemaClient
from kinema.errors import DataLoss, DeadlineExceeded, InvalidInput, NotFound
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.storage.artifacts import artifact_key

from .conftest import BUCKET

pytestmark = pytest.mark.slow

PROMPT = "a small red sphere to the left of a blue cube"
STEPS = 3


def test_generate_streams_progress_and_downloads_verified_pngs(kinema, tmp_path) -> None:
    seen = []
    result = kinema.generate(PROMPT, n=2, seed=5, steps=STEPS, on_progress=seen.append)
    assert [(p.step, p.total) for p in seen] == [(s, STEPS) for s in range(1, STEPS + 1)]
    assert [(o.index, o.seed, o.provenance.seed) for o in result.outputs] == [(0, 5, 5), (1, 6, 6)]
    first, second = result.outputs

    path = kinema.download(first, tmp_path / "sub" / "a.png")
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == first.artifact.sha256 and len(data) == first.artifact.size_bytes
    assert Image.open(path).size == (64, 64) and [p.name for p in path.parent.iterdir()] == ["a.png"]
    assert kinema.read(second) != data and hashlib.sha256(kinema.read(second)).hexdigest() == second.artifact.sha256

    # By sha256 alone (GetArtifact first), and from an output whose URL expired (a fresh one is asked for).
    got = kinema.get_artifact(first.artifact.sha256, url_ttl_seconds=60)
    assert got.artifact == first.artifact and got.provenance == first.provenance
    assert kinema.download(first.artifact.sha256, tmp_path / "b.png").read_bytes() == data
    stale = pb.Output()
    stale.CopyFrom(first)
    stale.presigned_url = "http://127.0.0.1:1/expired"
    stale.expires_at.FromSeconds(1)
    assert kinema.read(stale) == data


def test_a_tampered_artifact_is_caught_and_nothing_is_written(server, job_s3, tmp_path) -> None:
    with KinemaClient(server.address, tenant="tampered", timeout=120) as kinema:
        (output,) = kinema.generate("a green cone", seed=1, steps=1).outputs
        # Replace the stored bytes behind the store's back, keeping its metadata (as tests/storage does).
        s3 = Minio(job_s3.endpoint, job_s3.access_key, job_s3.secret_key, secure=False)
        key = artifact_key("tampered", output.artifact.sha256)
        meta = {k: v for k, v in s3.stat_object(BUCKET, key).metadata.items() if k.lower().startswith("x-amz-meta-")}
        evil = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
        s3.put_object(BUCKET, key, io.BytesIO(evil), len(evil), metadata=meta)

        target = tmp_path / "cone.png"
        target.write_bytes(b"kept")
        with pytest.raises(DataLoss) as info:
            kinema.download(output, target)
        assert info.value.reason == "SHA256_MISMATCH" and output.artifact.sha256 in str(info.value)
        assert "X-Amz-Signature" not in str(info.value)
        assert target.read_bytes() == b"kept" and [p.name for p in tmp_path.iterdir()] == ["cone.png"]
        with pytest.raises(DataLoss):
            kinema.read(output.artifact.sha256)


def test_jobs_submit_watch_list_and_cancel(server) -> None:
    C, R, X = pb.JOB_STATE_COMPLETED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_CANCELLED
    with KinemaClient(server.address, tenant="client-jobs", timeout=120) as kinema:
        job = kinema.submit_job(PROMPT, seed=7, steps=STEPS)
        assert job.state == pb.JOB_STATE_QUEUED and job.tenant == "client-jobs" and job.request.seed == 7
        snapshots = []
        done = kinema.watch_job(job.id, snapshots.append)
        assert done.state == C and snapshots[-1] == done and (done.progress.step, done.progress.total) == (3, 3)
        assert kinema.get_job(job.id).outputs[0].artifact == done.outputs[0].artifact
        data = kinema.read(done.outputs[0])
        assert hashlib.sha256(data).hexdigest() == done.outputs[0].artifact.sha256

        class Running(Exception):
            pass

        def stop_once_running(j: pb.Job) -> None:
            if j.state == R and j.progress.step >= 2:
                raise Running  # ends the watch, never the job

        long = kinema.submit_job("a purple cube", steps=1000)
        with pytest.raises(Running):
            kinema.watch_job(long.id, stop_once_running)
        assert kinema.get_job(long.id).state == R
        asked = kinema.cancel_job(long.id)
        assert asked.cancel_requested and asked.state in (R, X)
        stopped = kinema.watch_job(long.id)
        assert stopped.state == X and not stopped.outputs and stopped.progress.step < 1000

        assert [j.id for j in kinema.list_jobs()] == [long.id, job.id]
        assert [j.id for j in kinema.list_jobs("completed")] == [job.id]
        assert [j.id for j in kinema.list_jobs(pb.JOB_STATE_CANCELLED)] == [long.id]
        assert [j.id for j in kinema.list_jobs(limit=1)] == [long.id]

    with KinemaClient(server.address, tenant="someone-else") as other:
        with pytest.raises(NotFound):
            other.get_job(job.id)
        assert other.list_jobs() == []


def test_catalogues(kinema) -> None:
    assert [p.name for p in kinema.list_pipelines()] == ["edit_video", "image_to_image", "inpaint", "text_to_image"]
    (t2i,) = kinema.list_pipelines("text_to_image")
    assert t2i.name == "text_to_image" and t2i.output_media_type == "image/png"
    assert kinema.list_pipelines("nope") == []
    models = kinema.list_models()
    assert [c.capability for c in models] == ["autoencoder", "denoiser", "text_encoder", "video_denoiser"]
    assert all(c.available and c.models for c in models)


def test_errors_are_domain_errors_with_the_servers_message_and_code(kinema) -> None:
    with pytest.raises(NotFound) as info:
        kinema.get_job("nosuchjob")
    e = info.value
    assert (e.reason, e.field, e.metadata["grpc_code"], str(e)) == ("JOB_NOT_FOUND", "id", "NOT_FOUND",
                                                                     "no job 'nosuchjob'")  # fmt: skip
    for call in (lambda: kinema.generate(PROMPT, steps=1001), lambda: kinema.submit_job(PROMPT, steps=1001)):
        with pytest.raises(InvalidInput) as info:
            call()
        assert info.value.field == "steps" and info.value.metadata["grpc_code"] == "INVALID_ARGUMENT"
    with pytest.raises(NotFound) as info:
        kinema.generate(PROMPT, pipeline="video")
    assert info.value.reason == "PIPELINE_NOT_FOUND"
    with pytest.raises(NotFound):
        kinema.get_artifact("0" * 64)
    with pytest.raises(InvalidInput) as info:
        kinema.get_artifact("not-a-hash")
    assert info.value.field == "sha256"
    with pytest.raises(DeadlineExceeded) as info:  # the client's own deadline; the server stops the run
        kinema.generate(PROMPT, steps=1000, timeout=1.0)
    assert info.value.reason == "CLIENT_TIMEOUT" and "within 1 s" in str(info.value)
