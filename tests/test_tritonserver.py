"""The real tritonserver from the nvidia-pytriton wheel, over tiny python-backend models written here."""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kinema.errors import InvalidInput, NotFound, Unavailable
from kinema.processes import group_alive as _group_alive
from kinema.repository import default_models_dir
from kinema.tritonserver import TritonServer, TritonSettings, _ensure_stub, _Install

MODELS = default_models_dir()

CONFIG = """\
backend: "python"
max_batch_size: 8
dynamic_batching {{}}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "increment" value: {{ string_value: "{increment}" }} }}
"""

ADD_MODEL = """\
import json

import numpy as np
import triton_python_backend_utils as pb_utils

import kinema.errors  # the stub runs the venv's python, so the project's package imports


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.increment = np.float32(params["increment"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x + self.increment)]))
        return responses

    def finalize(self):
        pass
"""

BROKEN_MODEL = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights are missing on purpose")

    def execute(self, requests):
        return []
"""


def _write_model(root: Path, name: str, source: str, increment: float = 1.0) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(CONFIG.format(increment=increment))
    (root / name / "1" / "model.py").write_text(source)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    _write_model(root, "add_one", ADD_MODEL, 1.0)
    _write_model(root, "add_ten", ADD_MODEL, 10.0)
    (root / "notes").mkdir()  # no config.pbtxt: not a model
    return root


def _settings(models: Path, **kw) -> TritonSettings:
    return TritonSettings(models=models, http_port=0, grpc_port=0, metrics_port=0, startup_timeout=60.0, **kw)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver binds; ignores TIME_WAIT
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])  # host:port or http://host:port/path


def _ports(server: TritonServer) -> list[int]:
    return [_port_of(server.http_url), _port_of(server.grpc_url), _port_of(server.metrics_url)]


def _assert_gone(pgid: int, ports: list[int]) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert all(_port_free(p) for p in ports), ports


def _infer(grpc_url: str, model: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(grpc_url) as client:
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")])
        return result.as_numpy("OUTPUT0")


def test_serves_every_model_and_stops_its_whole_group(repo: Path, tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    with TritonServer(_settings(repo), log_path=log) as server:
        assert server.models == ("add_one", "add_ten")  # "notes" has no config.pbtxt
        x = np.arange(12, dtype=np.float32).reshape(3, 4)  # (batch, dims)
        np.testing.assert_array_equal(_infer(server.grpc_url, "add_one", x), x + 1)
        np.testing.assert_array_equal(_infer(server.grpc_url, "add_ten", x[:1]), x[:1] + 10)
        metrics = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        assert 'nv_inference_request_success{model="add_one"' in metrics
        pgid, ports = server.pid, _ports(server)
        assert pgid is not None and os.getpgid(pgid) == pgid  # its own group, not ours
        assert pgid != os.getpgrp()
        assert not any(_port_free(p) for p in ports)
    _assert_gone(pgid, ports)
    server.stop()  # idempotent
    assert "successfully unloaded 'add_one'" in log.read_text()  # SIGTERM let tritonserver unload its models


PID_MODEL = """\
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            time.sleep(float(x.max()))  # the request says how long the instance stays busy
            pid = np.full(x.shape, os.getpid(), np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", pid)]))
        return responses
"""


def test_a_lone_client_stays_on_the_denoisers_first_instance_and_a_busy_one_hands_over(tmp_path: Path) -> None:
    """The shipped denoiser's instance groups, on a model that answers with the pid of the instance that ran it."""
    groups = re.search(r"^instance_group \[.*?^\]", (MODELS / "denoiser" / "config.pbtxt").read_text(), re.M | re.S)
    assert groups is not None and groups.group().count("count: 1") == 2
    root = tmp_path / "models"
    (root / "pid" / "1").mkdir(parents=True)
    config = CONFIG.format(increment=0).replace("instance_group [ { kind: KIND_CPU count: 1 } ]", groups.group())
    assert groups.group() in config
    (root / "pid" / "config.pbtxt").write_text(config)
    (root / "pid" / "1" / "model.py").write_text(PID_MODEL)
    with TritonServer(_settings(root)) as server:

        def pid(busy: float = 0.0) -> int:
            return int(_infer(server.grpc_url, "pid", np.full((1, 1), busy, np.float32))[0, 0])

        for _ in range(2):  # the two instances start even: the first calls may go to either
            pid()
        first = pid()
        assert {pid() for _ in range(20)} == {first}  # one Sample's steps: all on one instance
        held = threading.Thread(target=pid, args=(2.0,))
        held.start()
        time.sleep(0.5)  # the 2-second call holds the instance it went to
        other = pid()
        held.join()
        assert other != first  # what arrives while it is busy runs on the other instance


def _stubs(server: TritonServer, model: str) -> list[int]:
    """The pids of `model`'s python-backend stubs (its processes are in the server's group)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.getpgid(int(entry.name)) != server.pid:
                continue
            if f"/{model}/1/model.py" in (entry / "cmdline").read_text().replace("\0", " "):
                found.append(int(entry.name))
        except (OSError, ProcessLookupError):  # gone meanwhile
            continue
    return found


def _stub_cpus(server: TritonServer, model: str) -> list[set[int]]:
    """The CPUs each python-backend stub of `model` may run on."""
    return [os.sched_getaffinity(pid) for pid in _stubs(server, model)]


def _minor_faults(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[7])  # field 10: minflt


@pytest.mark.parametrize("setting", ["launcher default", "0"])
def test_the_denoisers_instances_keep_to_a_cpu_each_unless_the_server_says_not(setting, monkeypatch) -> None:
    """The shipped denoiser asks for pinning (pin_cpus); `TritonServer` allows it unless KINEMA_TRITON_PIN_CPUS=0."""
    if setting == "0":
        monkeypatch.setenv("KINEMA_TRITON_PIN_CPUS", "0")
    else:
        monkeypatch.delenv("KINEMA_TRITON_PIN_CPUS", raising=False)
    mine = os.sched_getaffinity(0)
    with TritonServer(_settings(MODELS, models_to_load=("denoiser",))) as server:
        stubs = _stub_cpus(server, "denoiser")
    assert len(stubs) == 2  # the config's two instances
    if setting == "0":
        assert stubs == [mine, mine]
        return
    assert all(len(cpus) == 1 and cpus <= mine for cpus in stubs)
    if len(mine) > 1:
        assert stubs[0] != stubs[1]  # each its own core


def test_a_served_decode_reuses_the_memory_the_one_before_freed() -> None:
    """The stub keeps what a forward pass frees (`kinema.inference.allocator`, set in `triton_python.build`): with
    glibc's defaults each 64 px decode faulted 1,300-2,500 pages in again, 5-6 ms of it on this VM."""
    from tests.inference.test_allocator import faults_per_decode

    from kinema.inference.runner import TritonRunner

    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    with TritonServer(_settings(MODELS, models_to_load=("vae_decoder",))) as server:
        (stub,) = _stubs(server, "vae_decoder")
        runner = TritonRunner(server.grpc_url)
        for _ in range(3):
            runner.infer("vae_decoder", {"LATENT": latents})
        before = _minor_faults(stub)
        for _ in range(5):
            assert runner.infer("vae_decoder", {"LATENT": latents})["IMAGE"].shape == (1, 3, 64, 64)
        per_call = (_minor_faults(stub) - before) / 5
        runner.close()
    default = faults_per_decode("default")  # the same decode in a process with glibc's defaults
    assert 4 * per_call <= default, (per_call, default)  # 0-20 when quiet; 1,354 without the call in `build`


def test_loads_only_the_named_models(repo: Path) -> None:
    import tritonclient.http as httpclient

    with TritonServer(_settings(repo, models_to_load=("add_ten",))) as server:
        assert server.models == ("add_ten",)
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready("add_ten")
        assert not client.is_model_ready("add_one")
        client.close()


def test_wait_ready_times_out_with_the_log_tail(repo: Path) -> None:
    server = TritonServer(_settings(repo, models_to_load=("add_one",)))
    server.start()
    try:
        with pytest.raises(Unavailable, match=r"add_one not ready after 0\.001 s") as info:
            server.wait_ready(timeout=0.001)  # HTTP opens only after the startup loads, seconds later
        assert "lines of the server log" in str(info.value)
        cancel = threading.Event()
        cancel.set()
        assert server.wait_ready(cancel=cancel) is False  # how `kinema triton` gives up on SIGTERM
        assert server.wait_ready() is True
    finally:
        server.stop()


def test_broken_model_raises_unavailable_and_cleans_up(repo: Path) -> None:
    _write_model(repo, "broken", BROKEN_MODEL)
    server = TritonServer(_settings(repo))
    server.start()
    pgid, ports = server.pid, _ports(server)
    with pytest.raises(Unavailable, match="broken") as info:
        server.wait_ready()
    first = str(info.value).splitlines()[0]
    assert "weights are missing on purpose" in first and str(server.log_path) in first
    assert "last" in str(info.value) and "lines of the server log" in str(info.value)
    server.stop()
    _assert_gone(pgid, ports)


def test_broken_model_is_reported_by_state_when_the_server_stays_up(repo: Path) -> None:
    _write_model(repo, "broken", BROKEN_MODEL)
    settings = _settings(repo, extra_args=("--exit-on-error=false",))
    server = TritonServer(settings)
    with pytest.raises(Unavailable, match=r"model 'broken' failed to load: .*weights are missing on purpose"), server:
        pass
    assert server.poll() is not None  # __enter__ stopped it
    _assert_gone(server.pid, _ports(server))


def test_stop_kills_the_group_when_time_is_up(repo: Path) -> None:
    with TritonServer(_settings(repo, models_to_load=("add_one",))) as server:
        pgid = server.pid
        server.stop(timeout=0)  # no grace: SIGKILL for the whole group at once
        assert server.poll() == -signal.SIGKILL
        # Killed stubs lose their parent; where init does not reap, they linger as zombies (no ports, no memory).
        assert not _group_alive(pgid)
        assert all(_port_free(p) for p in _ports(server))


def test_bad_settings_and_missing_models(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        TritonSettings(models=tmp_path, http_port=70000)
    with pytest.raises(InvalidInput):
        TritonSettings(models=tmp_path, http_port=9000, grpc_port=9000)
    with pytest.raises(NotFound, match=r"config\.pbtxt"):
        TritonServer(_settings(tmp_path)).start()
    with pytest.raises(NotFound, match="nope"):
        TritonServer(_settings(tmp_path, models_to_load=("nope",))).start()
    with pytest.raises(NotFound):
        TritonServer(_settings(tmp_path / "absent")).start()
    TritonServer(_settings(tmp_path)).stop()  # never started: nothing to do


def test_python_backend_stub_is_copied_next_to_the_backend_once(tmp_path: Path) -> None:
    install = _Install(root=tmp_path / "tritonserver", libs=tmp_path / "libs")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = install.root / "python_backend_stubs" / version / "triton_python_backend_stub"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"\x7fELF stub")
    (install.backends / "python").mkdir(parents=True)
    _ensure_stub(install)
    dst = install.backends / "python" / "triton_python_backend_stub"
    assert dst.read_bytes() == src.read_bytes() and os.access(dst, os.X_OK)
    mtime = dst.stat().st_mtime_ns
    _ensure_stub(install)
    assert dst.stat().st_mtime_ns == mtime  # already in place: not copied again
    assert sorted(p.name for p in dst.parent.iterdir()) == ["triton_python_backend_stub"]  # no temp file left


def _run_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kinema.cli", "triton", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_cli_serves_until_sigterm(repo: Path) -> None:
    proc = _run_cli(["--models", str(repo), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"])
    try:
        line = proc.stdout.readline()
        assert line.startswith("triton ready: grpc=127.0.0.1:"), (line, proc.stderr.read() if not line else "")
        fields = dict(f.split("=", 1) for f in line.split()[2:])
        assert fields["models"] == "add_one,add_ten"
        x = np.ones((1, 3), dtype=np.float32)
        np.testing.assert_array_equal(_infer(fields["grpc"], "add_one", x), x + 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
    ports = [_port_of(fields[k]) for k in ("grpc", "http", "metrics")]
    assert all(_port_free(p) for p in ports)


def test_cli_reports_errors_in_one_line(repo: Path) -> None:
    _write_model(repo, "broken", BROKEN_MODEL)
    proc = _run_cli(["--models", str(repo), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("kinema: error: ") and "'broken'" in err
    assert "Traceback" not in err
    script = textwrap.dedent("""
        import sys
        from kinema.tritonserver import main
        sys.exit(main(sys.argv[1:]))
    """)
    res = subprocess.run(
        [sys.executable, "-c", script, "--models", str(repo / "absent")], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and res.stderr.startswith("kinema.tritonserver: error: ") and res.stderr.count("\n") == 1


def test_triton_over_mutual_tls_serves_only_clients_with_a_certificate_from_its_ca(repo: Path, pki) -> None:
    """The wheel's tritonserver takes --grpc-use-ssl-mutual; TritonRunner (a model service's client) presents the
    internal certificate (KINEMA_INTERNAL_TLS_*) and is refused without one. HTTP, the probes' port, stays plain."""
    from kinema.inference.runner import TritonRunner
    from kinema.rpc.settings import ServiceSettings
    from kinema.rpc.tls import channel_credentials, internal_credentials

    tls = ("--grpc-use-ssl-mutual=true", f"--grpc-server-cert={pki.server.cert}",
           f"--grpc-server-key={pki.server.key}", f"--grpc-root-cert={pki.ca}")  # fmt: skip
    internal = ServiceSettings(internal_tls_ca_file=str(pki.ca), internal_tls_cert_file=str(pki.client.cert),
                               internal_tls_key_file=str(pki.client.key))  # fmt: skip
    with TritonServer(_settings(repo, models_to_load=("add_one",), extra_args=tls)) as server:  # ready over HTTP
        runner = TritonRunner(server.grpc_url, credentials=internal_credentials(internal), timeout=10)
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        np.testing.assert_array_equal(runner.infer("add_one", {"INPUT0": x})["OUTPUT0"], x + 1)
        runner.close()
        for credentials in (None, channel_credentials(pki.ca)):  # plaintext; TLS without a client certificate
            refused = TritonRunner(server.grpc_url, credentials=credentials, timeout=10)
            with pytest.raises(Unavailable):
                refused.infer("add_one", {"INPUT0": x})
            refused.close()
