"""Upload an image, then edit it: image_to_image (strength) and inpaint (mask)."""

from __future__ import annotations

import hashlib
import io
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw

from kinema.common.v1 import common_pb2
from kinema.orchestrator.v1 import orchestrator_pb2 as pb


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def scene() -> Image.Image:
    """A red disc on a grey floor under a light sky: the kind of picture the mini models know."""
    image = Image.new("RGB", (64, 64), (150, 170, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 40, 63, 63), fill=(120, 110, 100))
    draw.ellipse((18, 22, 42, 46), fill=(200, 40, 40))
    return image


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)  # (H, W, 3)


def result_bytes(events: list[pb.GenerateResponse]) -> tuple[pb.Output, bytes]:
    (output,) = events[-1].result.outputs
    data = urllib.request.urlopen(output.presigned_url, timeout=60).read()
    assert hashlib.sha256(data).hexdigest() == output.artifact.sha256
    return output, data


@pytest.fixture(scope="module")
def uploaded(kinema) -> tuple[bytes, pb.UploadArtifactResponse]:
    data = png(scene())
    return data, kinema.upload(data, "image/png", filename="scene.png", chunk=4096)  # several chunks


def test_an_upload_is_stored_whole_under_its_hash_with_provenance(kinema, uploaded) -> None:
    data, response = uploaded
    ref = response.artifact
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size_bytes == len(data)
    assert ref.media_type == "image/png"
    got = kinema.artifact(ref.sha256)
    assert got.provenance.pipeline == "upload" and got.provenance.parameters["filename"] == "scene.png"
    assert urllib.request.urlopen(got.presigned_url, timeout=60).read() == data
    assert kinema.upload(data, "image/png").artifact.sha256 == ref.sha256  # the same bytes: the same artifact


def test_image_to_image_follows_the_input_more_the_lower_the_strength(kinema, uploaded) -> None:
    data, response = uploaded
    source = pixels(data)
    errors = {}
    for strength in (0.2, 1.0):
        events = kinema.generate(pipeline="image_to_image", prompts=["a red sphere"], strength=strength, steps=10,
                                 seed=3, inputs={"image": response.artifact.sha256})  # fmt: skip
        steps = [e.progress.total for e in events if e.WhichOneof("event") == "progress"]
        assert set(steps) == {int(np.ceil(strength * 10))}
        output, image = result_bytes(events)
        assert output.provenance.pipeline == "image_to_image"
        assert list(output.provenance.parent_sha256) == [response.artifact.sha256]
        errors[strength] = float(np.abs(pixels(image) - source).mean())
    assert errors[0.2] < 20 and errors[0.2] < errors[1.0], errors


def test_inpaint_keeps_what_the_mask_keeps(kinema, uploaded) -> None:
    data, response = uploaded
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)  # regenerate the left half
    mask_ref = kinema.upload(png(mask), "image/png", filename="mask.png").artifact
    inputs = {"image": response.artifact.sha256, "mask": mask_ref.sha256}
    events = kinema.generate(pipeline="inpaint", prompts=["a blue cube"], inputs=inputs, steps=10, seed=5)
    output, image = result_bytes(events)
    assert sorted(output.provenance.parent_sha256) == sorted([response.artifact.sha256, mask_ref.sha256])
    source, result = pixels(data), pixels(image)
    kept = np.abs(result[:, 40:] - source[:, 40:]).mean()  # away from the seam
    changed = np.abs(result[:, :24] - source[:, :24]).mean()
    assert kept < 12 and changed > kept, (kept, changed)


def reason_of(err: grpc.RpcError) -> str:
    for key, value in err.trailing_metadata() or ():
        if key == "kinema-error-bin":
            return common_pb2.ErrorDetail.FromString(value).reason
    return ""


def test_bad_uploads_store_nothing(kinema) -> None:
    data = png(scene().rotate(90))
    bad_hash = [pb.UploadArtifactRequest(header=pb.UploadHeader(media_type="image/png", size_bytes=len(data),
                                                                sha256="0" * 64)),
                pb.UploadArtifactRequest(chunk=data)]  # fmt: skip
    with pytest.raises(grpc.RpcError) as info:
        kinema.stub.UploadArtifact(iter(bad_hash), metadata=kinema.metadata, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(info.value) == "SHA256_MISMATCH"
    with pytest.raises(grpc.RpcError) as info:
        kinema.artifact(hashlib.sha256(data).hexdigest())
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was stored

    too_big = [pb.UploadArtifactRequest(header=pb.UploadHeader(media_type="image/png", size_bytes=1 << 40))]
    with pytest.raises(grpc.RpcError) as info:
        kinema.stub.UploadArtifact(iter(too_big), metadata=kinema.metadata, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason_of(info.value) == "ARTIFACT_TOO_LARGE"

    short = [pb.UploadArtifactRequest(header=pb.UploadHeader(media_type="image/png", size_bytes=len(data) + 1)),
             pb.UploadArtifactRequest(chunk=data)]  # fmt: skip
    with pytest.raises(grpc.RpcError) as info:
        kinema.stub.UploadArtifact(iter(short), metadata=kinema.metadata, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bytes_that_are_not_the_image_they_claim_are_refused_at_upload(kinema) -> None:
    text = b"this is text, not a PNG"
    with pytest.raises(grpc.RpcError) as info:
        kinema.upload(text, "image/png")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(info.value) == "NOT_AN_IMAGE"
    with pytest.raises(grpc.RpcError) as info:
        kinema.artifact(hashlib.sha256(text).hexdigest())
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
