"""edit_video behind the orchestrator: the pipeline adapter in process (request checks, defaults, ListPipelines), then
over real processes (Triton, the text encoder, autoencoder, denoiser and depth services, a SeaweedFS S3 server,
redis-server, a Celery worker and the orchestrator): an uploaded clip edited as a durable job and through Generate,
its MP4 stored with its sha256 and provenance and equal to the embedded `edit_video` within H.264's error, bad inputs
refused with the field at fault, a cancel that stops the denoiser, and `kinema --server ... edit-video`."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from kinema.cli import main as kinema_main
from kinema.data import World
from kinema.errors import FailedPrecondition, InvalidInput
from kinema.orchestration.capabilities import RemoteCapabilities
from kinema.orchestration.pipelines import REGISTRY, EditVideoPipeline
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.pipelines.edit_video import EditVideoRequest, edit_video, edit_video_file
from kinema.pipelines.local import load_local_video
from kinema.rpc.process import ServiceProcess
from kinema.rpc.status import parse_error_detail
from kinema.storage.artifacts import Provenance, S3ArtifactStore
from kinema.storage.video import open_video, read_metadata, write_video

from .conftest import jobs_env, start_job_worker
from .test_jobs import Client, artifacts_of

Q, R, C, F, X = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED,
                 pb.JOB_STATE_CANCELLED)  # fmt: skip
BUCKET = "kinema-video"
MAX_FRAMES = 8  # KINEMA_VIDEO_MAX_FRAMES of the stack below
PROMPT = "a red cube"
# Overlapping windows of 4 frames over a 6-frame clip at 32 x 32, sampled together: 2 steps.
FIELDS = {"prompts": [PROMPT], "seed": 4, "steps": 2, "width": 32, "height": 32}
OPTIONS = {"structure": 0.2, "temporal_guidance": 1.5, "window": 4, "overlap": 2}
EMBEDDED = EditVideoRequest(prompt=PROMPT, seed=4, steps=2, width=32, height=32, structure=0.2, temporal_guidance=1.5,
                            window=4, overlap=2)  # fmt: skip
VIDEO = "a" * 64  # an input's sha256 for the in-process checks (nothing is looked up)


def clip(index: int, frames: int) -> np.ndarray:
    return np.round(World().clip("test", index, frames).rgb * 255).astype(np.uint8)  # (F, 64, 64, 3)


def mp4(frames: np.ndarray, path: Path) -> bytes:
    write_video(path, frames, fps=8)
    return path.read_bytes()


def decoded(data: bytes) -> np.ndarray:
    with open_video(data) as reader:
        return np.stack(list(reader.frames())).astype(int)  # (F, H, W, 3)


def request(**fields) -> pb.PipelineRequest:
    """An edit_video PipelineRequest: `fields` over FIELDS (None: unset), `options` over OPTIONS, `inputs` as
    name -> sha256."""
    options = OPTIONS | fields.pop("options", {})
    inputs = fields.pop("inputs", {})
    given = {k: v for k, v in (FIELDS | fields).items() if v is not None}
    r = json_format.ParseDict({"pipeline": "edit_video", **given}, pb.PipelineRequest())
    r.options.update(options)
    for name, sha in inputs.items():
        r.inputs[name].sha256 = sha
    return r


def error_of(call) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    detail = parse_error_detail(info.value.trailing_metadata())
    assert "Traceback" not in (info.value.details() or "")
    return info.value.code(), detail.field, detail.reason


# -- the adapter, in process ---------------------------------------------------------------------------------------


def test_ListPipelines_describes_edit_video() -> None:
    (info,) = REGISTRY.infos("edit_video")
    assert info.output_media_type == "video/mp4"
    assert list(info.capabilities) == ["autoencoder", "depth", "text_encoder", "video_denoiser"]
    inputs = {i.name: i for i in info.inputs}
    assert inputs["video"].required and "video/mp4" in inputs["video"].media_types
    assert not inputs["content_image"].required and "image/png" in inputs["content_image"].media_types
    params = {p.name: p for p in info.parameters}
    read = ("prompts", "negative_prompt", "seed", "steps", "guidance", "strength", "width", "height",
            "options.structure", "options.temporal_guidance", "options.window", "options.overlap")  # fmt: skip
    assert set(read) <= set(params)
    assert params["options.window"].default_value.number_value == 8 and params["steps"].default_value.number_value == 28


def test_prepare_fills_in_the_library_defaults() -> None:
    unset = request(prompts=["x"], seed=None, steps=None, width=None, height=None, inputs={"video": VIDEO})
    plan = EditVideoPipeline().prepare(unset, 16)
    r = plan.request
    assert (r.prompt, r.steps, r.width, r.height, r.guidance, r.strength, r.shift) == ("x", 28, 64, 64, 4.0, 1.0, 1.0)
    assert (r.structure, r.window, r.overlap) == (0.2, 4, 2) and plan.frames == 0
    assert 0 <= r.seed < EditVideoPipeline.seed_limit and r.content_image is None
    zero = request(guidance=0.0, options={"temporal_guidance": 0, "structure": 0}, inputs={"video": VIDEO})
    zero = EditVideoPipeline().prepare(zero, 16)
    assert (zero.request.guidance, zero.request.temporal_guidance, zero.request.structure) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({}, "inputs.video", "MISSING"),
        ({"inputs": {"video": VIDEO, "content_image": "b" * 64}}, "prompts", "CONFLICT"),
        ({"prompts": [], "inputs": {"video": VIDEO}}, "prompts", "MISSING"),
        ({"prompts": ["  "], "inputs": {"video": VIDEO}}, "prompts", "MISSING"),
        ({"prompts": ["a", "b"], "inputs": {"video": VIDEO}}, "prompts", "OUT_OF_RANGE"),
        ({"inputs": {"video": VIDEO, "mask": "b" * 64}}, "inputs.mask", "UNUSED_INPUT"),
        ({"sampler": "heun", "inputs": {"video": VIDEO}}, "sampler", "UNUSED_FIELD"),
        ({"options": {"nope": 1}, "inputs": {"video": VIDEO}}, "options.nope", "UNUSED_OPTION"),
        ({"options": {"window": 1}, "inputs": {"video": VIDEO}}, "options.window", "OUT_OF_RANGE"),
        ({"options": {"window": 4.5}, "inputs": {"video": VIDEO}}, "options.window", "OUT_OF_RANGE"),
        ({"options": {"overlap": 4}, "inputs": {"video": VIDEO}}, "options.overlap", "OUT_OF_RANGE"),
        ({"options": {"structure": 1.5}, "inputs": {"video": VIDEO}}, "options.structure", "OUT_OF_RANGE"),
        ({"options": {"structure": "high"}, "inputs": {"video": VIDEO}}, "options.structure", "OUT_OF_RANGE"),
        ({"options": {"frames": -1}, "inputs": {"video": VIDEO}}, "options.frames", "OUT_OF_RANGE"),
        ({"seed": EditVideoPipeline.seed_limit, "inputs": {"video": VIDEO}}, "seed", "OUT_OF_RANGE"),
        ({"width": 300, "inputs": {"video": VIDEO}}, "width", "OUT_OF_RANGE"),
        ({"steps": 1001, "inputs": {"video": VIDEO}}, "steps", "OUT_OF_RANGE"),
        ({"strength": 1.5, "inputs": {"video": VIDEO}}, "strength", "OUT_OF_RANGE"),
    ],
)
def test_bad_requests_name_their_field(fields, field, reason) -> None:
    with pytest.raises(InvalidInput) as info:
        EditVideoPipeline().prepare(request(**fields), 16)
    assert (info.value.field, info.value.reason) == (field, reason), str(info.value)


def test_a_server_without_a_depth_service_refuses_edit_video() -> None:
    addresses = {cap: "127.0.0.1:9" for cap in ("text_encoder", "denoiser", "autoencoder")}
    capabilities = RemoteCapabilities(addresses)  # channels connect lazily: nothing is called here
    try:
        assert capabilities.listed == ["autoencoder", "denoiser", "text_encoder", "video_denoiser"]
        with pytest.raises(FailedPrecondition) as info:
            capabilities.bind(EditVideoPipeline.capabilities, {}, timeout=1.0)
        assert info.value.reason == "CAPABILITY_NOT_CONFIGURED" and info.value.metadata["setting"] == "KINEMA_DEPTH_URL"
    finally:
        capabilities.close()
    with_depth = RemoteCapabilities(addresses | {"depth": "127.0.0.1:9"})
    assert "depth" in with_depth.listed
    with_depth.close()


# -- over real processes -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def depth_service(triton, tmp_path_factory):
    env = {"KINEMA_BACKEND": "triton", "KINEMA_TRITON_URL": triton.grpc_url}
    proc = ServiceProcess("depth", tmp_path_factory.mktemp("depth-service"), **env).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    from kinema.jobs.redis_server import RedisServer, RedisSettings

    root = tmp_path_factory.mktemp("video-redis")
    with RedisServer(RedisSettings(data_dir=root / "data"), log_path=root / "redis.log") as server:
        yield server


@pytest.fixture(scope="module")
def env(services, depth_service, job_s3, redis_server) -> dict[str, str]:
    addresses = {name: s.address for name, s in services.items()} | {"depth": depth_service.address}
    return jobs_env(addresses, job_s3, redis_server.url, BUCKET, KINEMA_VIDEO_MAX_FRAMES=str(MAX_FRAMES))


@pytest.fixture(scope="module")
def video_orchestrator(env, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("video-stack")
    worker = start_job_worker(logs, env, concurrency=1)
    proc = ServiceProcess("orchestrator", logs, **env)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
        worker.stop()


@pytest.fixture(scope="module")
def client(video_orchestrator):
    c = Client(video_orchestrator, "video")
    yield c
    c.channel.close()


@pytest.fixture(scope="module")
def store(job_s3) -> S3ArtifactStore:
    return S3ArtifactStore(job_s3.endpoint, job_s3.access_key, job_s3.secret_key, BUCKET)


def upload(client: Client, data: bytes, media_type: str = "video/mp4", filename: str = "clip.mp4"):
    """The ArtifactRef of `data` uploaded in one chunk."""
    header = pb.UploadHeader(media_type=media_type, size_bytes=len(data), filename=filename)
    parts = [pb.UploadArtifactRequest(header=header), pb.UploadArtifactRequest(chunk=data)]
    return client.stub.UploadArtifact(iter(parts), timeout=60, metadata=client.md).artifact


@pytest.fixture(scope="module")
def video(client, tmp_path_factory) -> tuple[bytes, str]:
    data = mp4(clip(3, 6), tmp_path_factory.mktemp("clip") / "clip.mp4")
    return data, upload(client, data).sha256


@pytest.fixture(scope="module")
def embedded(video, tmp_path_factory) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """The embedded run of the same request on the same bytes: its frames as sampled, its MP4 decoded, and the
    models' hashes."""
    nets = load_local_video()
    out = tmp_path_factory.mktemp("embedded") / "edit.mp4"
    result = edit_video_file(EMBEDDED, video[0], out, *nets)
    frames: list[np.ndarray] = []
    with open_video(video[0]) as reader:
        edit_video(EMBEDDED, lambda: reader.frames(), frames.append, *nets)
    return np.stack(frames).astype(int), decoded(out.read_bytes()), result.models


def assert_same_clip(served: np.ndarray, sampled: np.ndarray, encoded: np.ndarray) -> None:
    """`served` (a served MP4, decoded) is the embedded clip: `sampled` as the embedded run made it, `encoded` its MP4.

    The served frames equal the embedded ones within one level before encoding (tests/services/
    test_video_denoiser_service.py), but H.264 at 32 x 32 (crf 18, 4:2:0) is no per-pixel witness: it is itself up
    to ~50 levels from its input here, and a one-level change in 1% of the input moves ~20 decoded values by up to
    ~25 levels (mean ~2). So: identical MP4 pictures when the frames were, else two encodings of nearly the same
    frames: closer to each other than H.264 is to its input, and within 3 levels on average."""
    assert served.shape == encoded.shape == sampled.shape
    if np.array_equal(served, encoded):
        return
    codec = np.mean((encoded - sampled) ** 2)
    assert np.mean((served - encoded) ** 2) < codec and np.abs(served - encoded).mean() <= 3.0


def submit(client: Client, r: pb.PipelineRequest) -> pb.Job:
    return client.stub.SubmitJob(pb.SubmitJobRequest(request=r), timeout=30, metadata=client.md).job


def generate(client: Client, r: pb.PipelineRequest) -> list[pb.GenerateResponse]:
    return list(client.stub.Generate(pb.GenerateRequest(request=r), timeout=300, metadata=client.md))


@pytest.mark.slow
def test_a_video_upload_is_probed_and_stored_with_its_provenance(client, video, store) -> None:
    data, sha = video
    assert sha == hashlib.sha256(data).hexdigest()
    got = client.stub.GetArtifact(pb.GetArtifactRequest(sha256=sha), timeout=10, metadata=client.md)
    assert got.artifact.media_type == "video/mp4" and got.provenance.pipeline == "upload"
    assert store.get(sha, "video") == data


@pytest.mark.slow
def test_ListModels_lists_the_video_denoiser_and_depth(client) -> None:
    reply = client.stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=client.md)
    listed = {c.capability: c for c in reply.capabilities}
    assert list(listed) == ["autoencoder", "denoiser", "depth", "text_encoder", "video_denoiser"]
    assert (listed["video_denoiser"].default_model, listed["depth"].default_model) == ("video_denoiser", "depth")
    assert {m.name for m in listed["video_denoiser"].models} == {"video_denoiser"}
    assert all(c.available and c.models for c in listed.values())


@pytest.mark.slow
def test_an_edit_video_job_stores_the_mp4_the_embedded_run_makes(client, video, embedded, job_s3) -> None:
    sha = video[1]
    job = submit(client, request(inputs={"video": sha}))
    assert job.state == Q and job.request.seed == 4
    snapshots = list(client.watch(job.id, timeout=300))
    done = snapshots[-1]
    assert done.state == C, done.error
    steps = [s.progress.step for s in snapshots if s.state == R and s.HasField("progress")]
    assert steps == sorted(steps) and all(s.progress.total == 2 for s in snapshots if s.progress.total)
    assert (done.progress.step, done.progress.total) == (2, 2)
    (output,) = done.outputs
    assert output.artifact.media_type == "video/mp4" and output.artifact.uri.startswith(f"s3://{BUCKET}/video/")
    got = urllib.request.urlopen(output.presigned_url, timeout=30).read()
    assert hashlib.sha256(got).hexdigest() == output.artifact.sha256 and len(got) == output.artifact.size_bytes
    assert output.artifact.sha256 in artifacts_of(job_s3, "video", BUCKET)

    sampled, encoded, models = embedded
    served = decoded(got)
    assert served.shape == (6, 32, 32, 3)
    assert_same_clip(served, sampled, encoded)

    p = output.provenance
    assert p.pipeline == "edit_video" and list(p.parent_sha256) == [sha] and p.seed == output.seed == 4
    assert {cap: m.sha256 for cap, m in p.models.items()} == models
    assert p.models["video_denoiser"].name == "video_denoiser" and p.models["depth"].name == "depth"
    reproduced = json_format.ParseDict(json_format.MessageToDict(p.parameters), pb.PipelineRequest())
    assert reproduced.inputs["video"].sha256 == sha and dict(reproduced.options) == OPTIONS | {"frames": 0}
    tags = json.loads(read_metadata(got)["provenance"])  # the MP4 says how it was made too
    assert tags["input_sha256"] == sha and tags["settings"]["window"] == 4

    # Generate runs the same pipeline code: the recorded request makes the same clip (within H.264's error).
    events = generate(client, reproduced)
    progress = [(e.progress.step, e.progress.total) for e in events if e.HasField("progress")]
    assert progress == [(1, 2), (2, 2)]
    (again,) = events[-1].result.outputs
    assert_same_clip(decoded(urllib.request.urlopen(again.presigned_url, timeout=30).read()), sampled, encoded)


@pytest.mark.slow
def test_content_from_an_uploaded_image_through_generate(client, video) -> None:
    import io

    png = io.BytesIO()
    Image.fromarray(clip(3, 1)[0][:, ::-1].copy()).save(png, format="PNG")
    image = upload(client, png.getvalue(), "image/png", "content.png").sha256
    events = generate(client, request(prompts=[], steps=1, options={"frames": 4},
                                      inputs={"video": video[1], "content_image": image}))  # fmt: skip
    (output,) = events[-1].result.outputs
    assert list(output.provenance.parent_sha256) == sorted([image, video[1]]) and not output.prompt_truncated
    assert decoded(urllib.request.urlopen(output.presigned_url, timeout=30).read()).shape == (4, 32, 32, 3)


@pytest.mark.slow
def test_bad_inputs_are_refused_with_their_field_and_never_become_jobs(client, video, store, tmp_path) -> None:
    before = [j.id for j in client.list(page_size=1000).jobs]
    # Uploads: not a video, and a video over the server's frame limit (KINEMA_VIDEO_MAX_FRAMES), from its header.
    long = mp4(clip(4, MAX_FRAMES + 4), tmp_path / "long.mp4")
    for data, reason in ((b"\0" * 64, "NOT_A_VIDEO"), (long, "VIDEO_TOO_LONG")):
        assert error_of(lambda data=data: upload(client, data)) == (grpc.StatusCode.INVALID_ARGUMENT, "chunk", reason)
    # A long video stored before the limit was lowered: refused at submit and by Generate, before any sampling.
    stored_long = store.put(long, "video/mp4", Provenance(pipeline="upload"), "video").sha256
    png = store.put(_png(), "image/png", None, "video")
    cases = [
        (request(inputs={"video": stored_long}), "inputs.video", "VIDEO_TOO_LONG"),
        (request(inputs={"video": png.sha256}), "inputs.video", "UNSUPPORTED_MEDIA_TYPE"),
        (request(inputs={"video": video[1], "content_image": png.sha256}), "prompts", "CONFLICT"),
        (request(), "inputs.video", "MISSING"),
        (request(inputs={"video": "0" * 64}), "inputs.video", "ARTIFACT_NOT_FOUND"),
    ]
    for r, field, reason in cases:
        code = grpc.StatusCode.NOT_FOUND if reason == "ARTIFACT_NOT_FOUND" else grpc.StatusCode.INVALID_ARGUMENT
        assert error_of(lambda r=r: submit(client, r)) == (code, field, reason)
    assert error_of(lambda: generate(client, cases[0][0])) == (grpc.StatusCode.INVALID_ARGUMENT, "inputs.video",
                                                                "VIDEO_TOO_LONG")  # fmt: skip
    assert [j.id for j in client.list(page_size=1000).jobs] == before


@pytest.mark.slow
def test_what_only_the_run_can_tell_fails_the_job_with_its_field(client, video, store, job_s3) -> None:
    stored = artifacts_of(job_s3, "video", BUCKET)
    # A video whose header is whole but whose data is cut short: it uploads (one frame decodes), then its job
    # FAILS when the frames are read for depth, before any sampling.
    data = video[0]
    cut = upload(client, data[: len(data) - 50], filename="cut.mp4").sha256
    # A window over the video model's max_frames: known once the denoiser service answers.
    for r, field, reason in ((request(inputs={"video": cut}), "inputs.video", "NOT_A_VIDEO"),
                             (request(inputs={"video": video[1]}, options={"window": 100}), "options.window",
                              "OUT_OF_RANGE")):  # fmt: skip
        job = client.finished(submit(client, r).id, timeout=120)
        assert job.state == F and not job.outputs and job.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert (job.error.detail.field, job.error.detail.reason) == (field, reason), job.error.message
        assert job.error.message.startswith(field) and job.progress.step == 0  # before any sampling step
    assert artifacts_of(job_s3, "video", BUCKET) == sorted([*stored, cut])


def _video_calls(service: ServiceProcess) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith('kinema_model_seconds_count{backend="triton",model="video_denoiser"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.slow
def test_cancel_stops_a_running_edit_in_the_denoiser_and_stores_nothing(client, video, services, job_s3) -> None:
    stored = artifacts_of(job_s3, "video", BUCKET)
    job = submit(client, request(steps=1000, inputs={"video": video[1]}))
    watch = client.watch(job.id, timeout=300)
    for snapshot in watch:
        if snapshot.state == R and snapshot.progress.step >= 2:
            break
    asked = client.cancel(job.id)
    assert asked.cancel_requested and asked.state in (R, X)
    *_, last = watch
    assert last.state == X and not last.outputs and 2 <= last.progress.step < 1000
    time.sleep(1.0)  # let an evaluation in flight finish
    calls = _video_calls(services["denoiser"])
    time.sleep(1.5)
    assert _video_calls(services["denoiser"]) == calls  # the service's loop stopped within a step
    assert artifacts_of(job_s3, "video", BUCKET) == stored  # no MP4, whole or half


@pytest.mark.slow
def test_the_cli_runs_edit_video_on_the_server(video_orchestrator, tmp_path, capsys) -> None:
    source = tmp_path / "in.mp4"
    mp4(clip(5, 6), source)
    out = tmp_path / "out.mp4"
    server = ["--server", video_orchestrator.address, "--tenant", "video-cli"]
    rc = kinema_main(["edit-video", str(source), *server, "--prompt", PROMPT, "--steps", "1", "--size", "32",
                      "--window", "4", "-o", str(out), "-q"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip() == str(out) and "job " in captured.err
    assert decoded(out.read_bytes()).shape == (6, 32, 32, 3)
    assert json.loads(read_metadata(out)["provenance"])["settings"]["window"] == 4
    # Keyframe propagation: frame 3 edited on the server (image_to_image), then carried through the first 4 frames.
    kf = tmp_path / "kf.mp4"
    keyframe = ["--keyframe-prompt", "a red sphere", "--keyframe", "3", "--frames", "4"]
    rc = kinema_main(["edit-video", str(source), *server, *keyframe, "--steps", "1", "--size", "32", "--window", "4",
                      "-o", str(kf), "-q"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert decoded(kf.read_bytes()).shape == (4, 32, 32, 3) and kf.with_suffix(".keyframe.png").is_file()
    settings = json.loads(read_metadata(kf)["provenance"])["settings"]
    assert settings["prompt"] == "" and len(settings["content_image_sha256"]) == 64
    capsys.readouterr()
    # The server's error names this command's option.
    rc = kinema_main(["edit-video", str(source), *server, "--prompt", PROMPT, "--window", "100", "--steps", "1",
                      "--size", "32", "-o", str(tmp_path / "bad.mp4"), "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "--window: window must be in 2..64" in err and not (tmp_path / "bad.mp4").exists()


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
