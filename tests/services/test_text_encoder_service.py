"""The text encoder service over real gRPC with its network in-process (KINEMA_BACKEND=local, no Triton) and a
prompt limit of 64 characters (KINEMA_MAX_PROMPT_CHARS): a longer prompt is INVALID_ARGUMENT before the tokenizer
sees it, one at the limit is encoded, and the service stays up."""

from __future__ import annotations

import grpc
import pytest

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
    proc = ServiceProcess("text_encoder", root, KINEMA_BACKEND="local", KINEMA_MAX_PROMPT_CHARS=str(LIMIT)).start()
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
