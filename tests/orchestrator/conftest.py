"""The orchestrator as its own process (`python -m services.orchestrator`) over the session's real model services
(`triton`, `services` in tests/conftest.py), with a local-folder artifact store."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from kinema.orchestrator.v1 import orchestrator_pb2_grpc
from kinema.rpc.process import ServiceProcess, free_port


def start_orchestrator(log_dir: Path, artifacts: Path, addresses: dict[str, str]) -> ServiceProcess:
    env = {f"KINEMA_{cap.upper()}_URL": address for cap, address in addresses.items()}
    return ServiceProcess("orchestrator", log_dir, KINEMA_ARTIFACTS=artifacts.as_uri(), **env).start()


@pytest.fixture(scope="session")
def orchestrator(services, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("orchestrator")
    proc = start_orchestrator(root, root / "artifacts", {name: s.address for name, s in services.items()})
    proc.artifacts = root / "artifacts"
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def lonely_orchestrator(tmp_path_factory: pytest.TempPathFactory):
    """An orchestrator whose model services are all down (nothing listens on their ports)."""
    root = tmp_path_factory.mktemp("lonely")
    addresses = {name: f"127.0.0.1:{free_port()}" for name in ("text_encoder", "denoiser", "autoencoder")}
    proc = start_orchestrator(root, root / "artifacts", addresses)
    proc.artifacts = root / "artifacts"
    try:
        yield proc
    finally:
        proc.stop()


def stub_of(proc: ServiceProcess):
    channel = grpc.insecure_channel(proc.address)
    return channel, orchestrator_pb2_grpc.OrchestratorStub(channel)
