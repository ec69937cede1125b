"""Triton goes away under a running service: UNAVAILABLE, the service stays up, and recovers when Triton is back."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kinema.repository import default_models_dir
from kinema.rpc.process import ServiceProcess, free_port
from kinema.text_encoder.v1 import text_encoder_pb2, text_encoder_pb2_grpc

pytestmark = pytest.mark.slow


def _triton(ports: tuple[int, int, int], log):
    from kinema.tritonserver import TritonServer, TritonSettings

    http, grpc_port, metrics = ports
    settings = TritonSettings(models=default_models_dir(), http_port=http, grpc_port=grpc_port, metrics_port=metrics,
                              models_to_load=("text_encoder",))  # fmt: skip
    server = TritonServer(settings, log_path=log)
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def test_triton_down_gives_unavailable_and_the_service_recovers(tmp_path):
    ports = (free_port(), free_port(), free_port())
    triton = _triton(ports, tmp_path / "triton-1.log")
    service = ServiceProcess("text_encoder", tmp_path, KINEMA_BACKEND="triton", KINEMA_TRITON_URL=triton.grpc_url)
    try:
        service.start()
        with service.channel() as channel:
            stub = text_encoder_pb2_grpc.TextEncoderStub(channel)
            request = text_encoder_pb2.EncodeRequest(prompts=["a red cube"])
            assert stub.Encode(request, timeout=30).model.name == "text_encoder"

            triton.stop()
            with pytest.raises(grpc.RpcError) as info:
                stub.Encode(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Triton" in info.value.details() and "Traceback" not in info.value.details()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING and service.proc.poll() is None

            triton = _triton(ports, tmp_path / "triton-2.log")
            deadline = time.monotonic() + 30
            while True:  # the client channel reconnects with backoff
                try:
                    assert stub.Encode(request, timeout=30).model.name == "text_encoder"
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() < deadline, "service did not recover after Triton came back"
                    time.sleep(0.5)
    finally:
        service.stop()
        triton.stop()
