"""UploadArtifact into a real S3 server, then image_to_image and inpaint through Generate over the real model
services: uploads round trip with their provenance, limits and bad streams fail with the right status and store
nothing, the edits equal the embedded runs, bad inputs name their field, and S3 down is UNAVAILABLE."""

from __future__ import annotations

import hashlib
import io
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from kinema.common.v1 import common_pb2
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.pipelines import (
    ImageToImageRequest,
    InpaintRequest,
    TextToImageRequest,
    image_to_image,
    inpaint,
    text_to_image,
)
from kinema.pipelines.local import load_local
from kinema.rpc.process import ServiceProcess, free_port
from kinema.rpc.status import parse_error_detail
from kinema.storage.artifacts import S3ArtifactStore
from kinema.storage.s3server import S3Server, S3ServerSettings

from .conftest import stub_of

pytestmark = pytest.mark.slow

BUCKET = "kinema-uploads"
MAX_BYTES = 200_000
MAX_SIDE = 512
STEPS = 6


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def messages(data: bytes, media_type: str = "image/png", chunk: int = 4096, **header):
    header = {"media_type": media_type, "size_bytes": len(data)} | header
    yield pb.UploadArtifactRequest(header=pb.UploadHeader(**header))
    for start in range(0, len(data), chunk):
        yield pb.UploadArtifactRequest(chunk=data[start : start + chunk])


def tenant(name: str) -> tuple[tuple[str, str], ...]:
    return (("kinema-tenant", name),)


def status(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() != grpc.StatusCode.INTERNAL and "Traceback" not in (err.details() or ""), err.details()
    return err.code(), parse_error_detail(err.trailing_metadata()) or common_pb2.ErrorDetail()


@pytest.fixture(scope="module")
def server(services, job_s3, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("uploads")
    env = {f"KINEMA_{name.upper()}_URL": s.address for name, s in services.items()}
    env |= {"KINEMA_S3_ACCESS_KEY": job_s3.access_key, "KINEMA_S3_SECRET_KEY": job_s3.secret_key,
            "KINEMA_ARTIFACTS": f"s3://{BUCKET}?endpoint={job_s3.endpoint}",
            "KINEMA_UPLOAD_MAX_BYTES": str(MAX_BYTES), "KINEMA_UPLOAD_MAX_IMAGE_SIDE": str(MAX_SIDE)}  # fmt: skip
    proc = ServiceProcess("orchestrator", root, **env).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def stub(server):
    channel, stub = stub_of(server)
    yield stub
    channel.close()


@pytest.fixture(scope="module")
def store(job_s3) -> S3ArtifactStore:
    return S3ArtifactStore(job_s3.endpoint, job_s3.access_key, job_s3.secret_key, BUCKET)


@pytest.fixture(scope="module")
def local():
    return load_local()


@pytest.fixture(scope="module")
def picture(local) -> np.ndarray:
    return text_to_image(TextToImageRequest(prompts=["a purple cube"], steps=STEPS, seed=21), *local).images[0]


@pytest.fixture(scope="module")
def uploaded(stub, picture) -> tuple[bytes, pb.UploadArtifactResponse]:
    data = png(picture)
    return data, stub.UploadArtifact(messages(data, filename="cube.png"), timeout=30)


def test_an_upload_round_trips_with_its_provenance(stub, uploaded, store) -> None:
    data, reply = uploaded
    ref = reply.artifact
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size_bytes == len(data)
    assert ref.media_type == "image/png" and ref.uri == f"s3://{BUCKET}/default/{ref.sha256[:2]}/{ref.sha256}"
    got = stub.GetArtifact(pb.GetArtifactRequest(sha256=ref.sha256), timeout=10)
    assert got.artifact == ref and got.provenance.pipeline == "upload"
    assert json_format.MessageToDict(got.provenance.parameters) == {"filename": "cube.png"}
    assert not got.provenance.HasField("seed") and not got.provenance.models and not got.provenance.parent_sha256
    assert urllib.request.urlopen(got.presigned_url, timeout=10).read() == data
    # The same bytes again (in one chunk, with their hash): the artifact as first stored.
    again = stub.UploadArtifact(messages(data, chunk=1 << 20, sha256=ref.sha256), timeout=30)
    assert again.artifact == ref
    # Scoped to the tenant: another one does not see it.
    code, _ = status(lambda: stub.GetArtifact(pb.GetArtifactRequest(sha256=ref.sha256), timeout=10,
                                              metadata=tenant("acme")))  # fmt: skip
    assert code == grpc.StatusCode.NOT_FOUND


def test_a_jpeg_upload(stub, picture) -> None:
    reply = stub.UploadArtifact(messages(png(picture, "JPEG"), "image/jpeg"), timeout=30, metadata=tenant("jpeg"))
    assert reply.artifact.media_type == "image/jpeg" and reply.artifact.uri.startswith(f"s3://{BUCKET}/jpeg/")


BAD = np.zeros((8, 8, 3), np.uint8)
NOISE = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("stream", "code", "field", "reason"),
    [
        (lambda: iter([]), grpc.StatusCode.INVALID_ARGUMENT, "header", "MISSING"),
        (lambda: iter([pb.UploadArtifactRequest(chunk=b"x")]), grpc.StatusCode.INVALID_ARGUMENT, "header", "MISSING"),
        (
            lambda: iter(
                [
                    *messages(png(BAD)),
                    pb.UploadArtifactRequest(header=pb.UploadHeader(media_type="image/png", size_bytes=1)),
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "chunk",
            "REPEATED_HEADER",
        ),
        (
            lambda: messages(png(BAD), size_bytes=MAX_BYTES + 1),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "header.size_bytes",
            "ARTIFACT_TOO_LARGE",
        ),
        (
            lambda: messages(png(BAD), size_bytes=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.size_bytes",
            "OUT_OF_RANGE",
        ),
        (
            lambda: messages(png(BAD), size_bytes=len(png(BAD)) + 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.size_bytes",
            "SIZE_MISMATCH",
        ),
        (
            lambda: messages(png(BAD), size_bytes=len(png(BAD)) - 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.size_bytes",
            "SIZE_MISMATCH",
        ),
        (
            lambda: iter(
                [
                    pb.UploadArtifactRequest(header=pb.UploadHeader(media_type="image/png", size_bytes=10)),
                    pb.UploadArtifactRequest(chunk=b"\0" * ((1 << 20) + 1)),
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "chunk",
            "CHUNK_TOO_LARGE",
        ),
        (
            lambda: messages(png(BAD), sha256="0" * 64),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.sha256",
            "SHA256_MISMATCH",
        ),
        (
            lambda: messages(png(BAD), sha256="XYZ"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.sha256",
            "INVALID_SHA256",
        ),
        (lambda: messages(b"hello, not an image"), grpc.StatusCode.INVALID_ARGUMENT, "chunk", "NOT_AN_IMAGE"),
        (lambda: messages(png(NOISE)[:200]), grpc.StatusCode.INVALID_ARGUMENT, "chunk", "NOT_AN_IMAGE"),
        (lambda: messages(png(BAD, "JPEG")), grpc.StatusCode.INVALID_ARGUMENT, "chunk", "MEDIA_TYPE_MISMATCH"),
        (
            lambda: messages(png(np.zeros((8, MAX_SIDE + 8, 3), np.uint8))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "chunk",
            "IMAGE_TOO_LARGE",
        ),
        (lambda: messages(b"\0" * 64, "video/mp4"), grpc.StatusCode.INVALID_ARGUMENT, "chunk", "NOT_A_VIDEO"),
        (lambda: messages(png(BAD), "video/mp4"), grpc.StatusCode.INVALID_ARGUMENT, "chunk", "MEDIA_TYPE_MISMATCH"),
        (
            lambda: messages(png(BAD), "image/gif"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.media_type",
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            lambda: messages(png(BAD), "text/plain"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.media_type",
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            lambda: messages(png(BAD), filename="x" * 256),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.filename",
            "OUT_OF_RANGE",
        ),
    ],
)
def test_bad_uploads_fail_with_their_status_and_store_nothing(stub, store, stream, code, field, reason) -> None:
    got, detail = status(lambda: stub.UploadArtifact(stream(), timeout=30, metadata=tenant("bad")))
    assert (got, detail.field, detail.reason) == (code, field, reason)
    if reason == "ARTIFACT_TOO_LARGE":
        assert detail.metadata["max_bytes"] == str(MAX_BYTES)
    assert store.list("bad") == []


def test_an_unread_media_type_names_the_accepted_ones(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadArtifact(messages(b"GIF89a" + b"\0" * 64, "image/gif"), timeout=30)
    assert "image/jpeg, image/png, video/mp4, video/quicktime, video/webm" in info.value.details()


def _generate(stub, request: pb.PipelineRequest, metadata=()):
    events = list(stub.Generate(pb.GenerateRequest(request=request), timeout=180, metadata=metadata))
    return events[-1].result.outputs


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_image_to_image_from_an_upload_equals_the_embedded_run(stub, uploaded, picture, local) -> None:
    _, reply = uploaded
    request = pb.PipelineRequest(pipeline="image_to_image", prompts=["a green cone"], seed=4, steps=STEPS,
                                 strength=0.6)  # fmt: skip
    request.inputs["image"].CopyFrom(reply.artifact)
    events = list(stub.Generate(pb.GenerateRequest(request=request), timeout=180))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [(p.step, p.total) for p in progress] == [(s, 4) for s in range(1, 5)]  # ceil(0.6 * 6) steps
    (output,) = events[-1].result.outputs
    want = image_to_image(ImageToImageRequest(prompts=["a green cone"], image=picture, strength=0.6, seed=4,
                                              steps=STEPS), *local)  # fmt: skip
    got = _pixels(urllib.request.urlopen(output.presigned_url, timeout=10).read())
    assert got.shape == (64, 64, 3) and np.abs(got - want.images[0]).max() <= 1
    p = output.provenance
    assert p.pipeline == "image_to_image" and list(p.parent_sha256) == [reply.artifact.sha256] and p.seed == 4
    again = json_format.ParseDict(json_format.MessageToDict(p.parameters), pb.PipelineRequest())
    assert again.inputs["image"].sha256 == reply.artifact.sha256 and abs(again.strength - 0.6) < 1e-6
    assert (again.width, again.height, again.steps) == (64, 64, STEPS)
    assert _generate(stub, again)[0].artifact.sha256 == output.artifact.sha256  # the provenance reproduces it


def test_inpaint_with_an_uploaded_mask_equals_the_embedded_run(stub, uploaded, picture, local) -> None:
    _, image = uploaded
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 24:56] = 255
    mask_ref = stub.UploadArtifact(messages(png(mask)), timeout=30).artifact
    request = pb.PipelineRequest(pipeline="inpaint", prompts=["a yellow sphere"], seed=9, steps=STEPS)
    request.inputs["image"].CopyFrom(image.artifact)
    request.inputs["mask"].CopyFrom(mask_ref)
    (output,) = _generate(stub, request)
    want = inpaint(InpaintRequest(prompts=["a yellow sphere"], image=picture, mask=mask, seed=9, steps=STEPS), *local)
    got = _pixels(urllib.request.urlopen(output.presigned_url, timeout=10).read())
    assert np.abs(got - want.images[0]).max() <= 1
    assert sorted(output.provenance.parent_sha256) == sorted([image.artifact.sha256, mask_ref.sha256])
    outside = np.kron(mask[::8, ::8] < 128, np.ones((8, 8))).astype(bool)  # whole 8x8 blocks away from the mask
    assert np.abs(got - picture.astype(int))[outside].mean() < 4.0


def test_bad_inputs_name_their_field(stub, uploaded, picture) -> None:
    _, image = uploaded
    small = stub.UploadArtifact(messages(png(np.zeros((32, 64), np.uint8))), timeout=30).artifact
    theirs = stub.UploadArtifact(messages(png(picture[::-1].copy())), timeout=30, metadata=tenant("acme")).artifact
    odd = stub.UploadArtifact(messages(png(np.zeros((60, 60, 3), np.uint8))), timeout=30).artifact

    def request(pipeline="image_to_image", inputs=None, **fields) -> pb.PipelineRequest:
        r = pb.PipelineRequest(pipeline=pipeline, prompts=["a cube"], steps=2, **fields)
        for name, ref in (inputs if inputs is not None else {"image": image.artifact}).items():
            r.inputs[name].CopyFrom(ref)
        return r

    unknown = common_pb2.ArtifactRef(sha256="ab" * 32)
    cases = [
        (request(inputs={"image": unknown}), grpc.StatusCode.NOT_FOUND, "inputs.image", "ARTIFACT_NOT_FOUND"),
        (request(inputs={"image": theirs}), grpc.StatusCode.NOT_FOUND, "inputs.image", "ARTIFACT_NOT_FOUND"),
        (request(inputs={}), grpc.StatusCode.INVALID_ARGUMENT, "inputs.image", "MISSING"),
        (
            request(inputs={"image": image.artifact, "mask": small}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs.mask",
            "UNUSED_INPUT",
        ),
        (request(strength=1.5), grpc.StatusCode.INVALID_ARGUMENT, "strength", "OUT_OF_RANGE"),
        (request(strength=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "strength", "OUT_OF_RANGE"),
        (request(width=32), grpc.StatusCode.INVALID_ARGUMENT, "width", "SIZE_MISMATCH"),
        (request(inputs={"image": odd}), grpc.StatusCode.INVALID_ARGUMENT, "inputs.image", "OUT_OF_RANGE"),
        (
            request("inpaint", {"image": image.artifact, "mask": small}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs.mask",
            "SIZE_MISMATCH",
        ),
        (request("inpaint"), grpc.StatusCode.INVALID_ARGUMENT, "inputs.mask", "MISSING"),
        (request("text_to_image"), grpc.StatusCode.INVALID_ARGUMENT, "inputs", "UNUSED_FIELD"),
    ]
    for r, code, field, reason in cases:
        got, detail = status(lambda r=r: _generate(stub, r))
        assert (got, detail.field, detail.reason) == (code, field, reason), (r, got, detail)


def test_s3_down_is_unavailable_nothing_is_half_written_and_uploads_recover(tmp_path, picture) -> None:
    data = png(picture)
    s3 = S3Server(S3ServerSettings(data_dir=tmp_path / "s3"), log_path=tmp_path / "weed.log")
    s3.start()
    s3.wait_ready()
    settings = s3.resolved_settings
    addresses = {f"KINEMA_{name.upper()}_URL": f"127.0.0.1:{free_port()}" for name in ("text_encoder", "denoiser",
                                                                                          "autoencoder")}  # fmt: skip
    env = addresses | {"KINEMA_S3_ACCESS_KEY": s3.access_key, "KINEMA_S3_SECRET_KEY": s3.secret_key,
                       "KINEMA_ARTIFACTS": f"s3://{BUCKET}?endpoint={s3.endpoint}"}  # fmt: skip
    proc = ServiceProcess("orchestrator", tmp_path, **env).start()
    channel, stub = stub_of(proc)
    try:
        s3.stop()
        code, detail = status(lambda: stub.UploadArtifact(messages(data), timeout=60))
        assert code == grpc.StatusCode.UNAVAILABLE and detail.reason == "S3_UNAVAILABLE"
        request = pb.PipelineRequest(pipeline="image_to_image", prompts=["a cube"], steps=2)
        request.inputs["image"].sha256 = hashlib.sha256(data).hexdigest()
        code, _ = status(lambda: _generate(stub, request))
        assert code == grpc.StatusCode.UNAVAILABLE
        s3 = S3Server(settings, log_path=tmp_path / "weed-again.log")
        s3.start()
        s3.wait_ready()
        store = S3ArtifactStore(s3.endpoint, s3.access_key, s3.secret_key, BUCKET)
        assert not store.exists(hashlib.sha256(data).hexdigest())  # the failed upload left nothing
        ref = stub.UploadArtifact(messages(data), timeout=60).artifact
        assert store.get(ref.sha256) == data
    finally:
        channel.close()
        proc.stop()
        s3.stop()
