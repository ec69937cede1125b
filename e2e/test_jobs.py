"""text -> image as a durable job: submit, watch, list, cancel mid-run, resubmit with a key."""

from __future__ import annotations

import hashlib
import urllib.request
import uuid

import grpc
import pytest

from kinema.orchestrator.v1 import orchestrator_pb2 as pb

Q, R, C, F, X = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED,
                 pb.JOB_STATE_CANCELLED)  # fmt: skip


def test_a_job_runs_to_completion_with_progress_and_a_downloadable_output(kinema) -> None:
    job = kinema.submit(prompts=["a small yellow cube"], steps=5)
    assert job.state in (Q, R) and job.tenant == kinema.tenant and job.request.HasField("seed") and job.id
    snapshots = list(kinema.watch(job.id))
    assert [s.state for s in snapshots][-1] == C and {s.state for s in snapshots} <= {Q, R, C}
    steps = [s.progress.step for s in snapshots if s.HasField("progress")]
    assert steps == sorted(steps) and steps[-1] == 5
    done = snapshots[-1]
    (output,) = done.outputs
    assert output.seed == job.request.seed and output.provenance.pipeline == "text_to_image"
    data = urllib.request.urlopen(output.presigned_url, timeout=60).read()
    assert hashlib.sha256(data).hexdigest() == output.artifact.sha256
    assert kinema.get(job.id).state == C
    listed = kinema.call("ListJobs", pb.ListJobsRequest(page_size=1000)).jobs
    assert job.id in [j.id for j in listed]
    assert job.id in [j.id for j in kinema.call("ListJobs", pb.ListJobsRequest(state=C)).jobs]


def test_a_resubmit_with_the_same_key_returns_the_same_job(kinema) -> None:
    key = str(uuid.uuid4())
    first = kinema.submit(key=key, prompts=["a blue sphere"], steps=2)
    again = kinema.submit(key=key, prompts=["a blue sphere"], steps=2)
    assert again.id == first.id and again.idempotency_key == key
    with pytest.raises(grpc.RpcError) as info:
        kinema.submit(key=key, prompts=["another prompt"], steps=2)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert kinema.finished(first.id).state == C


def test_cancel_stops_a_running_job_and_it_stores_nothing(kinema) -> None:
    job = kinema.submit(prompts=["a purple cone"], steps=1000)
    watch = kinema.watch(job.id)
    for snapshot in watch:
        if snapshot.state == R and snapshot.progress.step >= 2:
            break
    else:
        raise AssertionError("the job ended before it could be cancelled")
    asked = kinema.cancel(job.id)
    assert asked.cancel_requested and asked.state in (R, X)
    *_, last = watch
    assert last.state == X and not last.outputs and 2 <= last.progress.step < 1000 and last.finished_at.seconds
    assert kinema.cancel(job.id) == kinema.get(job.id)  # idempotent once terminal


def test_jobs_belong_to_their_tenant(kinema, other_tenant) -> None:
    job = kinema.submit(prompts=["a red cube"], steps=1)
    for call in (other_tenant.get, other_tenant.cancel, lambda i: list(other_tenant.watch(i))):
        with pytest.raises(grpc.RpcError) as info:
            call(job.id)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert job.id not in [j.id for j in other_tenant.call("ListJobs", pb.ListJobsRequest(page_size=1000)).jobs]
    assert kinema.finished(job.id).state == C


def test_a_job_that_cannot_run_fails_with_the_reason(kinema) -> None:
    request = pb.SubmitJobRequest(request=pb.PipelineRequest(pipeline="text_to_image", prompts=["a cube"], steps=2,
                                                             width=12, height=12))  # fmt: skip
    job = kinema.finished(kinema.call("SubmitJob", request).job.id)
    assert job.state == F and not job.outputs
    assert job.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and job.error.detail.field == "width"
    assert "Traceback" not in job.error.message
