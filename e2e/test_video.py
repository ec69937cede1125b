"""Upload a clip, then edit it as a durable job (edit_video, Gen-1): progress, one MP4 with its sha256 and
provenance, bad inputs refused with their field, a cancel mid-run."""

from __future__ import annotations

import hashlib
import io
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from kinema.data import World
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.rpc.status import parse_error_detail
from kinema.storage.video import open_video, write_video

R, C, X = pb.JOB_STATE_RUNNING, pb.JOB_STATE_COMPLETED, pb.JOB_STATE_CANCELLED
FRAMES = 6


def edit(video: str, prompts=("a red cube",), content_image: str = "", steps: int = 2) -> pb.PipelineRequest:
    """edit_video at 32 x 32 in windows of 4 frames sharing 2, sampled together over the clip."""
    request = pb.PipelineRequest(pipeline="edit_video", prompts=list(prompts), steps=steps, seed=7, width=32,
                                 height=32)  # fmt: skip
    request.options.update({"window": 4, "overlap": 2, "structure": 0.2, "temporal_guidance": 1.5})
    request.inputs["video"].sha256 = video
    if content_image:
        request.inputs["content_image"].sha256 = content_image
    return request


def frames_of(data: bytes) -> np.ndarray:
    with open_video(data) as reader:
        return np.stack(list(reader.frames()))  # (F, H, W, 3)


@pytest.fixture(scope="module")
def clip(kinema, tmp_path_factory) -> tuple[bytes, str]:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, np.round(World().clip("test", 2, FRAMES).rgb * 255).astype(np.uint8), fps=8)
    data = path.read_bytes()
    return data, kinema.upload(data, "video/mp4", filename="clip.mp4").artifact.sha256


def test_edit_video_is_listed(kinema) -> None:
    (info,) = kinema.call("ListPipelines", pb.ListPipelinesRequest(name="edit_video")).pipelines
    assert info.output_media_type == "video/mp4" and "video_denoiser" in info.capabilities
    assert [(i.name, i.required) for i in info.inputs] == [("video", True), ("content_image", False)]


def test_a_clip_is_edited_as_a_job_into_one_mp4(kinema, clip) -> None:
    data, sha = clip
    assert sha == hashlib.sha256(data).hexdigest()
    job = kinema.call("SubmitJob", pb.SubmitJobRequest(request=edit(sha))).job
    snapshots = list(kinema.watch(job.id))
    done = snapshots[-1]
    assert done.state == C, done.error
    steps = [s.progress.step for s in snapshots if s.HasField("progress")]
    assert steps == sorted(steps) and (done.progress.step, done.progress.total) == (2, 2)  # a step covers every window
    (output,) = done.outputs
    assert output.artifact.media_type == "video/mp4" and output.seed == 7
    assert output.provenance.pipeline == "edit_video" and list(output.provenance.parent_sha256) == [sha]
    assert {"depth", "video_denoiser", "text_encoder", "autoencoder"} <= set(output.provenance.models)
    mp4 = urllib.request.urlopen(output.presigned_url, timeout=60).read()
    assert hashlib.sha256(mp4).hexdigest() == output.artifact.sha256
    assert frames_of(mp4).shape == (FRAMES, 32, 32, 3)
    assert kinema.artifact(output.artifact.sha256).provenance == output.provenance


def test_bad_video_inputs_name_their_field(kinema, clip) -> None:
    with pytest.raises(grpc.RpcError) as info:
        kinema.upload(b"not a video" * 20, "video/mp4")
    detail = parse_error_detail(info.value.trailing_metadata())
    assert (info.value.code(), detail.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "NOT_A_VIDEO")
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(png, format="PNG")
    image = kinema.upload(png.getvalue(), "image/png").artifact.sha256
    for request, field in ((edit(clip[1], content_image=image), "prompts"),  # prompt and content image: one only
                           (edit(image), "inputs.video"),  # an image is no video
                           (edit(clip[1], prompts=()), "prompts")):  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            kinema.call("SubmitJob", pb.SubmitJobRequest(request=request))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert parse_error_detail(info.value.trailing_metadata()).field == field


def test_cancel_stops_a_running_edit_and_it_stores_nothing(kinema, clip) -> None:
    job = kinema.call("SubmitJob", pb.SubmitJobRequest(request=edit(clip[1], steps=1000))).job
    watch = kinema.watch(job.id)
    for snapshot in watch:
        if snapshot.state == R and snapshot.progress.step >= 2:
            break
    else:
        raise AssertionError("the job ended before it could be cancelled")
    assert kinema.cancel(job.id).cancel_requested
    *_, last = watch
    assert last.state == X and not last.outputs and 2 <= last.progress.step < last.progress.total
