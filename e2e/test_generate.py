"""text -> image while the client waits: progress, the stored result, its provenance and its download."""

from __future__ import annotations

import hashlib
import io
import time
import urllib.request

import grpc
import pytest
from google.protobuf import json_format
from PIL import Image

from kinema.orchestrator.v1 import orchestrator_pb2 as pb

STEPS = 6


@pytest.fixture(scope="module")
def generated(kinema) -> list[pb.GenerateResponse]:
    return kinema.generate(prompts=["a red sphere to the left of a blue cube", "a green cone"], seed=11, steps=STEPS)


def download(url: str) -> bytes:
    return urllib.request.urlopen(url, timeout=60).read()


def test_the_stream_is_progress_then_one_result(generated) -> None:
    *progress, last = generated
    assert all(e.WhichOneof("event") == "progress" for e in progress) and last.WhichOneof("event") == "result"
    steps = [(e.progress.step, e.progress.total) for e in progress]
    assert steps == [(i, STEPS) for i in range(1, STEPS + 1)]
    elapsed = [e.progress.elapsed_seconds for e in progress]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0


def test_outputs_download_whole_through_their_presigned_urls(generated) -> None:
    outputs = generated[-1].result.outputs
    assert [o.index for o in outputs] == [0, 1] and [o.seed for o in outputs] == [11, 12]
    for o in outputs:
        assert o.artifact.media_type == "image/png" and o.expires_at.seconds > time.time()
        data = download(o.presigned_url)
        assert len(data) == o.artifact.size_bytes and hashlib.sha256(data).hexdigest() == o.artifact.sha256
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
    assert outputs[0].artifact.sha256 != outputs[1].artifact.sha256


def test_provenance_names_the_request_seed_and_models_and_reproduces_the_image(kinema, generated) -> None:
    output = generated[-1].result.outputs[0]
    got = kinema.artifact(output.artifact.sha256, ttl=120)
    assert got.artifact == output.artifact and got.provenance == output.provenance
    assert 100 <= got.expires_at.seconds - time.time() <= 130
    p = got.provenance
    assert p.pipeline == "text_to_image" and p.seed == 11 and not p.parent_sha256
    assert set(p.models) == {"text_encoder", "denoiser", "autoencoder"}
    assert all(m.name and m.version and len(m.sha256) == 64 for m in p.models.values())
    params = json_format.MessageToDict(p.parameters)
    assert params["prompts"] == ["a red sphere to the left of a blue cube"] and params["steps"] == STEPS
    # The recorded parameters are a request that makes the very same artifact.
    request = json_format.ParseDict(params, pb.PipelineRequest())
    again = list(kinema.call("Generate", pb.GenerateRequest(request=request)))
    assert again[-1].result.outputs[0].artifact.sha256 == output.artifact.sha256


def test_a_seed_gives_the_same_image_whatever_the_batch(kinema, generated) -> None:
    alone = kinema.generate(prompts=["a green cone"], seed=12, steps=STEPS)
    assert alone[-1].result.outputs[0].artifact.sha256 == generated[-1].result.outputs[1].artifact.sha256


def test_another_tenant_cannot_see_the_artifacts(other_tenant, generated) -> None:
    with pytest.raises(grpc.RpcError) as info:
        other_tenant.artifact(generated[-1].result.outputs[0].artifact.sha256)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
