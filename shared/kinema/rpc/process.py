"""Start a Kinema service as its own process (`python -m services.<name>`, as its container runs it).

Used by the tests, the benchmarks and the local stack; the repository root must hold `services/`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kinema.processes import free_ports

REPO = Path(__file__).resolve().parents[3]
# The Triton models the text_encoder, autoencoder, denoiser, distill, depth and interpret services call (distill: the
# 4-step student; the denoiser: video_denoiser too, for SampleVideo; interpret also calls, for images, the
# autoencoder the iin_* models name: vector_ae_encoder / _decoder).
SERVED_MODELS = ("text_encoder", "vae_encoder", "vae_decoder", "denoiser", "denoiser_4step", "denoiser_2step",
                 "video_denoiser", "depth", "iin_factor", "iin_net2net", "iin_invariance", "vector_ae_encoder",
                 "vector_ae_decoder")  # fmt: skip


def free_port() -> int:
    return free_ports("127.0.0.1", 1)[0]


class ServiceProcess:
    """A service started as its own process, as the container runs it; stopped with SIGTERM."""

    def __init__(self, name: str, log_dir: Path, *, port: int = 0, log_name: str = "", detached: bool = False,
                 credentials: grpc.ChannelCredentials | None = None, **env: str) -> None:  # fmt: skip
        """`port` 0: any free port; `log_name` "": `<name>-<port>.log`; `detached`: its own session, so that it
        outlives the starting process and the terminal (the local stack), and no stdin; `credentials`: what the
        health check and `channel()` connect with to a service serving TLS (KINEMA_TLS_CERT_FILE)."""
        self.name = name
        self.credentials = credentials
        self.port, self.metrics_port = port or free_port(), free_port()
        self.detached = detached
        self.env = os.environ | {
            "KINEMA_PORT": str(self.port),
            "KINEMA_METRICS_PORT": str(self.metrics_port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        } | env  # fmt: skip
        self.log = log_dir / (log_name or f"{name}-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        return self.launch().wait_healthy(timeout)

    def launch(self) -> ServiceProcess:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", f"services.{self.name}"], cwd=REPO, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL if self.detached else None,
                                         start_new_session=self.detached)  # fmt: skip
        return self

    def wait_healthy(self, timeout: float = 60.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return self
                except grpc.RpcError:
                    time.sleep(0.2)
        raise RuntimeError(f"{self.name} not healthy after {timeout} s: {self.log.read_text()[-2000:]}")

    def channel(self, **options) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=list(options.items()))
        return grpc.secure_channel(self.address, self.credentials, options=list(options.items()))

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
