"""Real processes on loopback: one Triton over models/, each service as `python -m services.<name>`."""

from __future__ import annotations

import pytest

from kinema.repository import default_models_dir
from kinema.rpc.process import SERVED_MODELS, ServiceProcess


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory):
    from kinema.tritonserver import TritonServer, TritonSettings

    settings = TritonSettings(
        models=default_models_dir(), http_port=0, grpc_port=0, metrics_port=0, models_to_load=SERVED_MODELS
    )
    server = TritonServer(settings, log_path=tmp_path_factory.mktemp("triton") / "triton.log")
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def services(triton, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServiceProcess]:
    logs = tmp_path_factory.mktemp("services")
    env = {"KINEMA_BACKEND": "triton", "KINEMA_TRITON_URL": triton.grpc_url, "KINEMA_MAX_MESSAGE_BYTES": str(4 << 20)}
    procs = {name: ServiceProcess(name, logs, **env) for name in ("text_encoder", "autoencoder", "denoiser")}
    try:
        for p in procs.values():
            p.launch()
        for p in procs.values():
            p.wait_healthy()
        yield procs
    finally:
        for p in procs.values():
            p.stop()
