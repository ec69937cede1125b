import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kinema.repository import default_models_dir
from kinema.rpc.process import SERVED_MODELS, ServiceProcess
from kinema.storage.s3server import S3Server, S3ServerSettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    # Tiny training steps are op-overhead bound; with a second busy process on the machine, OpenMP
    # threads spin-waiting on each other make them ~100x slower than one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with tiny random networks in the shipped layout (for plumbing tests)."""
    from kinema.nn.autoencoder import Autoencoder, AutoencoderParams
    from kinema.nn.checkpoint import save_checkpoint
    from kinema.nn.mmdit import MMDiT, MMDiTParams
    from kinema.train.autoencoder import export

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderParams(block_out_channels=(8, 8, 8), norm_num_groups=4, latent_channels=4))
    export(ae, root, {"note": "tiny random test model"})
    mmdit = MMDiT(MMDiTParams(depth=2, hidden_size=32, num_heads=2, sample_size=16, pos_embed_max_size=32))
    for p in mmdit.parameters():  # adaLN-zero starts at zero output; give the test network a signal
        torch.nn.init.normal_(p, std=0.02)
    save_checkpoint(root / "denoiser/1/mmdit.safetensors", mmdit.state_dict(), mmdit.params)
    return root


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


@contextlib.contextmanager
def triton_services(
    triton, logs: Path, names: tuple[str, ...], extra: dict[str, dict[str, str]] | None = None
) -> Iterator[dict[str, ServiceProcess]]:
    """Model services `names` over `triton`, started side by side (launched together, then waited for); `extra` adds
    variables to a service's environment."""
    env = {"KINEMA_BACKEND": "triton", "KINEMA_TRITON_URL": triton.grpc_url, "KINEMA_MAX_MESSAGE_BYTES": str(4 << 20)}
    procs = {name: ServiceProcess(name, logs, **env | (extra or {}).get(name, {})) for name in names}
    try:
        for p in procs.values():
            p.launch()
        for p in procs.values():
            p.wait_healthy()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="session")
def services(triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    with triton_services(triton, tmp_path_factory.mktemp("services"), ("text_encoder", "autoencoder", "denoiser")) as p:
        yield p


@pytest.fixture(scope="session")
def job_s3(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS) for the job tests' artifacts (tests/orchestrator, tests/client)."""
    root = tmp_path_factory.mktemp("jobs-s3")
    with S3Server(S3ServerSettings(data_dir=root / "data"), log_path=root / "weed.log") as server:
        yield server


@pytest.fixture(scope="module")
def distill(triton, tmp_path_factory: pytest.TempPathFactory) -> ServiceProcess:
    """The distill service (services/distill) over the session's Triton, which serves the shipped 4-step student
    (SERVED_MODELS, as the chart and stack), for one test module."""
    env = {"KINEMA_BACKEND": "triton", "KINEMA_TRITON_URL": triton.grpc_url,
           "KINEMA_MAX_MESSAGE_BYTES": str(4 << 20)}  # fmt: skip
    proc = ServiceProcess("distill", tmp_path_factory.mktemp("distill-service"), **env).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory):
    """Throwaway TLS material (kinema.testing.certs): a CA (`authority`, to issue more), a server certificate for
    localhost / 127.0.0.1 and a client certificate it signed, and a client certificate of another CA (`stranger`)."""
    from types import SimpleNamespace

    from kinema.testing.certs import CertificateAuthority

    root = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(root / "ca"), CertificateAuthority(root / "other", "another-ca")
    return SimpleNamespace(ca=ca.cert, server=ca.issue("server"), client=ca.issue("client", hosts=()),
                           other_ca=other.cert, stranger=other.issue("client", hosts=()), authority=ca)  # fmt: skip
