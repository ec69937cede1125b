"""Fuzzing the model services over real gRPC (a sample; `bench/fuzz.py` sends thousands): every malformed request
(any field, Tensor dtype/shape/data in disagreement, NaN/Inf, odd Unicode, huge numbers) gets OK or a defined status,
never INTERNAL or UNKNOWN, and the service stays healthy."""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from kinema.autoencoder.v1 import autoencoder_pb2, autoencoder_pb2_grpc
from kinema.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from kinema.testing.fuzz import FORBIDDEN, classify, messages
from kinema.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc

EXAMPLES = int(os.environ.get("KINEMA_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))

RPCS = [
    ("text_encoder", text_encoder_pb2_grpc.TextEncoderStub, "Encode", text_encoder_pb2.EncodeRequest),
    ("text_encoder", text_encoder_pb2_grpc.TextEncoderStub, "ListModels", text_encoder_pb2.ListModelsRequest),
    ("autoencoder", autoencoder_pb2_grpc.AutoencoderStub, "Encode", autoencoder_pb2.EncodeRequest),
    ("autoencoder", autoencoder_pb2_grpc.AutoencoderStub, "Decode", autoencoder_pb2.DecodeRequest),
    ("autoencoder", autoencoder_pb2_grpc.AutoencoderStub, "ListModels", autoencoder_pb2.ListModelsRequest),
    ("denoiser", denoiser_pb2_grpc.DenoiserStub, "Sample", denoiser_pb2.SampleRequest),
    ("denoiser", denoiser_pb2_grpc.DenoiserStub, "Predict", denoiser_pb2.PredictRequest),
    ("denoiser", denoiser_pb2_grpc.DenoiserStub, "SampleVideo", denoiser_pb2.SampleVideoRequest),
    ("denoiser", denoiser_pb2_grpc.DenoiserStub, "ListModels", denoiser_pb2.ListModelsRequest),
]


@pytest.mark.slow
@pytest.mark.parametrize(("service", "stub_type", "method", "request_type"), RPCS,
                         ids=[f"{s}.{m}" for s, _, m, _ in RPCS])  # fmt: skip
def test_malformed_requests_get_a_defined_status_and_the_service_stays_up(
    services, service, stub_type, method, request_type
) -> None:
    check_rpc(services[service], stub_type, method, messages(request_type))


def check_rpc(process, stub_type, method: str, strategy) -> None:
    """EXAMPLES requests drawn from `strategy` to `method`: none answered FORBIDDEN, and the service SERVING after."""
    seen: dict[grpc.StatusCode, int] = {}
    with process.channel() as channel:
        call = getattr(stub_type(channel), method)

        @FUZZ
        @given(strategy)
        def one(request) -> None:
            try:
                code = classify(lambda: call(request, timeout=60))
            except grpc.RpcError as e:  # raised while iterating a stream
                code = e.code()
            seen[code] = seen.get(code, 0) + 1
            assert code not in FORBIDDEN, (code, str(request)[:500])

        one()
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    assert sum(seen.values()) >= min(EXAMPLES, 10), seen
