"""The text encoder service over real gRPC with its network in-process (KINEMA_BACKEND=local, no Triton), a
prompt limit of 64 characters (KINEMA_MAX_PROMPT_CHARS) and a batch limit of 2 (KINEMA_MAX_BATCH): a longer prompt
is INVALID_ARGUMENT before the tokenizer sees it, one at the limit is encoded, and the service stays up; prompts and
negative prompt that fit one batch go in one call, those that do not in two."""

from __future__ import annotations

import grpc
import pytest
import torch

from kinema.pipelines.remote import RemoteTextEncoder
from kinema.pipelines.text_to_image import encode_with_negative
from kinema.rpc import tensors
from kinema.rpc.process import ServiceProcess
from kinema.rpc.status import parse_error_detail
from kinema.text_encoder.v1 import text_encoder_pb2 as pb
from kinema.text_encoder.v1 import text_encoder_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

LIMIT = 64


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-encoder-local")
    proc = ServiceProcess("text_encoder", root, KINEMA_BACKEND="local", KINEMA_MAX_PROMPT_CHARS=str(LIMIT),
                          KINEMA_MAX_BATCH="2").start()  # fmt: skip
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(service):
    with service.channel() as channel:
        yield pb_grpc.TextEncoderStub(channel)


def test_a_prompt_over_the_limit_is_invalid_argument_and_the_service_stays_up(service, stub):
    at_limit = ("a red cube left of a blue sphere " * 2)[:LIMIT]
    for prompts, field in (([at_limit, "x" * (LIMIT + 1)], "prompts[1]"), (["\U0001f7e5" * (LIMIT + 1)], "prompts[0]")):
        with pytest.raises(grpc.RpcError) as e:
            stub.Encode(pb.EncodeRequest(prompts=prompts), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{field} has {LIMIT + 1} characters, over this server's limit of {LIMIT}" in e.value.details()
        assert "KINEMA_MAX_PROMPT_CHARS" in e.value.details()
        detail = parse_error_detail(e.value.trailing_metadata())
        assert (detail.reason, detail.field) == ("PROMPT_TOO_LONG", field)
        assert (detail.metadata["limit"], detail.metadata["length"]) == (str(LIMIT), str(LIMIT + 1))

    assert service.proc.poll() is None
    r = stub.Encode(pb.EncodeRequest(prompts=[at_limit, "\U0001f7e5" * LIMIT]), timeout=60)  # 64 characters each
    assert tensors.decode(r.pooled, "pooled").shape == (2, 384) and len(r.truncated) == 2


class Counting(RemoteTextEncoder):
    """The service's client, keeping the batch of every Encode it sends."""

    def __init__(self, channel) -> None:
        super().__init__(channel, timeout=60)
        self.batches: list[int] = []

    def encode(self, prompts):
        self.batches.append(len(prompts))
        return super().encode(prompts)


def test_prompts_and_negative_go_in_one_call_within_the_batch_limit_and_two_over_it(service):
    with service.channel() as channel:
        encoder = Counting(channel)
        cond, uncond = encode_with_negative(encoder, ["a red cube"], "")
        assert encoder.batches == [2] and cond.pooled.shape == uncond.pooled.shape == (1, 384)
        encoder.batches.clear()
        prompts = ["a red cube", "two green cones"]  # with the negative prompt, 3: over KINEMA_MAX_BATCH=2
        cond, uncond = encode_with_negative(encoder, prompts, "")
        assert encoder.batches == [3, 2, 1]  # refused as BATCH_TOO_LARGE, then one call each
        alone = encoder.encode(prompts)
        assert torch.equal(cond.tokens, alone.tokens) and torch.equal(uncond.pooled, encoder.encode([""]).pooled)
    assert service.proc.poll() is None
