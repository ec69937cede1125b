"""Run the real `tritonserver` from the nvidia-pytriton wheel over a model repository.

`TritonServer` starts the binary in its own process group, waits until every model it asked for
is ready, and on `stop()` ends exactly that group. The launch follows RECIPES.md: the python
backend stub sits next to `libtriton_python.so`, the venv's `bin` comes first on `PATH` (the stub
takes its interpreter from there and ignores `PYTHONPATH`), models load explicitly and readiness
is judged per model.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kinema.errors import InvalidInput, KinemaError, NotFound, Unavailable
from kinema.processes import free_ports, read_tail, stop_group
from kinema.repository import default_models_dir

_LOGGER = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
ORPHAN_GRACE = 2.0  # s a backend stub may take to notice tritonserver is gone and exit
# An instance's turn comes with its rate_limiter priority x the requests it has run, so a model whose instances have
# different priorities (models/denoiser/config.pbtxt) keeps a lone client's calls on one instance and spreads only
# what arrives while it is busy. The chart and the Triton image pass the same flag.
RATE_LIMIT = "--rate-limit=execution_count"
# "1": each CPU instance of a model whose config sets `pin_cpus` keeps to cores of its own
# (kinema.inference.triton_python.pinned_cpus). On here, where the machine is the server's; the chart's
# triton.pinCpus for pods with exclusive cores.
PIN_CPUS_SETTING = "KINEMA_TRITON_PIN_CPUS"


@dataclass(frozen=True)
class TritonSettings:
    """Where the model repository is, which ports to serve on (0 = any free port), what to load."""

    models: Path = field(default_factory=default_models_dir)
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    models_to_load: tuple[str, ...] | None = None  # None: every subfolder holding a config.pbtxt
    # Triton's custom model configuration: "gpu" loads each model's configs/gpu.pbtxt (KIND_GPU) where it has one,
    # its config.pbtxt otherwise; "" = config.pbtxt everywhere.
    model_config_name: str = ""
    log_verbose: int = 0
    startup_timeout: float = 120.0
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", Path(self.models))
        if self.models_to_load is not None:
            object.__setattr__(self, "models_to_load", tuple(self.models_to_load))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise InvalidInput(f"{name} must be between 0 and 65535, got {port}")
        ports = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if p]
        if len(set(ports)) != len(ports):
            raise InvalidInput(f"http, grpc and metrics ports must differ, got {ports}")
        if self.log_verbose < 0:
            raise InvalidInput(f"log_verbose must be >= 0, got {self.log_verbose}")
        if self.model_config_name and not self.model_config_name.replace("_", "").replace("-", "").isalnum():
            raise InvalidInput(f"model_config_name must be letters, digits, - and _, got {self.model_config_name!r}")
        if not self.startup_timeout > 0:
            raise InvalidInput(f"startup_timeout must be > 0, got {self.startup_timeout}")


@dataclass(frozen=True)
class _Install:
    """Paths inside the nvidia-pytriton wheel."""

    root: Path  # site-packages/pytriton/tritonserver
    libs: Path  # site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    @property
    def caches(self) -> Path:
        return self.root / "caches"


def find_install() -> _Install:
    """Locate tritonserver in the installed nvidia-pytriton wheel and put the python backend stub in place."""
    # Where `import pytriton` would load from, without running its __init__ (its client and Triton bindings).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise Unavailable("nvidia-pytriton is not installed (pip install nvidia-pytriton==0.7.0)")
    site = Path(spec.origin).resolve().parents[1]
    install = _Install(root=site / "pytriton" / "tritonserver", libs=site / "nvidia_pytriton.libs")
    if not os.access(install.binary, os.X_OK):
        raise Unavailable(f"no tritonserver binary at {install.binary}")
    _ensure_stub(install)
    return install


def _ensure_stub(install: _Install) -> None:
    """Copy the stub for this Python next to libtriton_python.so; the backend looks for it only there."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = install.root / "python_backend_stubs" / version / "triton_python_backend_stub"
    dst = install.backends / "python" / "triton_python_backend_stub"
    if dst.is_file() and os.access(dst, os.X_OK) and dst.stat().st_size == src.stat().st_size:
        return
    if not src.is_file():
        raise Unavailable(f"nvidia-pytriton ships no python backend stub for Python {version} ({src})")
    # Copy under a private name, then rename: a concurrent starter never sees a half-written stub.
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copy2(src, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise Unavailable(f"cannot install the python backend stub at {dst}: {e}") from None


def _model_names(settings: TritonSettings) -> tuple[str, ...]:
    if not settings.models.is_dir():
        raise NotFound(f"model repository {settings.models} is not a directory")
    if settings.models_to_load is None:
        names = tuple(sorted(p.parent.name for p in settings.models.glob("*/config.pbtxt")))
        if not names:
            raise NotFound(f"no model in {settings.models} has a config.pbtxt")
        return names
    if not settings.models_to_load:
        raise InvalidInput("models_to_load is empty")
    missing = [n for n in settings.models_to_load if not (settings.models / n).is_dir()]
    if missing:
        raise NotFound(f"no model folder {', '.join(missing)} in {settings.models}")
    return settings.models_to_load


class TritonServer:
    """One tritonserver process group: `start()`, `wait_ready()`, `stop()`, or use it as a context manager."""

    def __init__(self, settings: TritonSettings | None = None, log_path: Path | None = None) -> None:
        self.settings = settings or TritonSettings()
        self._log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._ports: tuple[int, int, int] | None = None  # http, grpc, metrics
        self._models: tuple[str, ...] = ()
        self._stopped = False

    # -- addresses -------------------------------------------------------------------------------

    def _port(self, i: int) -> int:
        if self._ports is None:
            raise RuntimeError("the server has not been started")
        return self._ports[i]

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.settings.host in ("", "0.0.0.0") else self.settings.host

    @property
    def http_url(self) -> str:
        """host:port, as `tritonclient.http.InferenceServerClient(url=...)` takes it."""
        return f"{self._client_host}:{self._port(0)}"

    @property
    def grpc_url(self) -> str:
        """host:port, as `tritonclient.grpc.InferenceServerClient(url=...)` takes it."""
        return f"{self._client_host}:{self._port(1)}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus scrape URL."""
        return f"http://{self._client_host}:{self._port(2)}/metrics"

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise RuntimeError("the server has not been started")
        return self._log_path

    @property
    def models(self) -> tuple[str, ...]:
        """The models this server was asked to load."""
        return self._models

    @property
    def pid(self) -> int | None:
        """Process id of tritonserver, which is also its process group id."""
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """tritonserver's exit status, or None while it runs (or was never started)."""
        return self._proc.poll() if self._proc else None

    # -- lifecycle -------------------------------------------------------------------------------

    def _command(self, install: _Install) -> list[str]:
        s = self.settings
        http, grpc, metrics = self._ports or (s.http_port, s.grpc_port, s.metrics_port)
        cmd = [
            str(install.binary),
            f"--model-repository={s.models.resolve()}",
            f"--backend-directory={install.backends}",
            f"--cache-directory={install.caches}",
            f"--http-address={s.host}",
            f"--grpc-address={s.host}",
            f"--metrics-address={s.host}",
            f"--http-port={http}",
            f"--grpc-port={grpc}",
            f"--metrics-port={metrics}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self._models),
            "--strict-readiness=false",
            "--exit-timeout-secs=5",
            RATE_LIMIT,
        ]
        if s.model_config_name:
            cmd.append(f"--model-config-name={s.model_config_name}")
        if s.log_verbose:
            cmd.append(f"--log-verbose={s.log_verbose}")
        return [*cmd, *s.extra_args]

    @staticmethod
    def _environment(install: _Install) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault(PIN_CPUS_SETTING, "1")
        # Not resolved: the venv's bin/python3 is a symlink, and through it the stub finds the venv.
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH", "")) if p)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(install.libs), libdir, env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def start(self) -> None:
        """Launch tritonserver in a new process group; returns at once (see `wait_ready`)."""
        if self._proc is not None:
            raise RuntimeError("this TritonServer was already started; make a new one")
        s = self.settings
        self._models = _model_names(s)
        install = find_install()
        import tritonclient.http  # noqa: F401 - wait_ready's client; slow to import, so before anything runs

        wanted = (s.http_port, s.grpc_port, s.metrics_port)
        free = iter(free_ports(s.host, wanted.count(0)))
        self._ports = tuple(p or next(free) for p in wanted)  # type: ignore[assignment]
        if self._log_path is None:
            self._log_path = Path(tempfile.mkdtemp(prefix="kinema-triton-")) / "tritonserver.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: nobody has to drain it, and it survives for the post-mortem.
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = self._command(install)
        _LOGGER.debug("starting %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._environment(install),
            cwd=s.models.resolve(),
            start_new_session=True,  # its own process group: stop() can end it and its backend stubs
        )

    def wait_ready(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        """Block until every requested model is ready (True) or `cancel` is set (False).

        Raises `Unavailable`, with the tail of the server log, if tritonserver exits, a model fails to
        load, or `timeout` s (default: settings.startup_timeout) pass first.
        """
        if self._proc is None:
            raise RuntimeError("the server has not been started")
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        timeout = self.settings.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending = list(self._models)
        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=5.0)
        try:
            while not (cancel and cancel.is_set()):
                status = self._proc.poll()
                if status is not None:
                    raise self._failure(f"tritonserver exited with status {status} before {', '.join(pending)} ready")
                try:
                    pending = [m for m in pending if not client.is_model_ready(m)]
                    if not pending:
                        return True
                    self._raise_if_failed(client.get_model_repository_index(), pending)
                except (InferenceServerException, OSError):
                    pass  # HTTP is not up yet: startup loads finish before the endpoints open
                if time.monotonic() > deadline:
                    raise self._failure(f"{', '.join(pending)} not ready after {timeout:g} s")
                time.sleep(0.1)
            return False
        finally:
            client.close()

    def _raise_if_failed(self, index: list[dict], pending: list[str]) -> None:
        for entry in index:
            if entry.get("name") in pending and entry.get("state") == "UNAVAILABLE" and entry.get("reason"):
                reason = entry["reason"].strip().splitlines()[0]
                raise self._failure(f"model {entry['name']!r} failed to load: {reason}")

    def _failure(self, summary: str) -> Unavailable:
        tail = self.log_tail()
        # With the default --exit-on-error a failed startup load ends the server; its last `error:` line
        # names the model and the exception, so it belongs in the one-line summary.
        errors = [line for line in tail if line.startswith("error:")]
        if errors:
            summary = f"{summary}: {errors[-1]}"
        return Unavailable(
            f"{summary} (log: {self._log_path})\n--- last {len(tail)} lines of the server log ---\n" + "\n".join(tail)
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last `lines` lines of the server log."""
        return read_tail(self._log_path, lines)

    def stop(self, timeout: float = 15.0) -> None:
        """End tritonserver and every process of its group; SIGKILL after `timeout` s. Idempotent.

        SIGTERM goes to tritonserver alone: it unloads its models and ends its python backend stubs
        itself. The stubs catch SIGTERM, and one orphaned mid-startup hangs on its dead parent's shared
        memory for good, so whatever outlives tritonserver by `ORPHAN_GRACE` s gets SIGKILL.
        """
        proc = self._proc
        if proc is None or self._stopped:
            return  # a second stop must not signal a group id the kernel may have handed out again
        try:
            stop_group(proc, "tritonserver", timeout, ORPHAN_GRACE)
            self._stopped = True
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- command line ---------------------------------------------------------------------------------


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535 (0 = any free port), got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=Path, default=None, help="model repository (default: KINEMA_MODELS or ./models)")
    p.add_argument("--http-port", type=_port, default=8000, help="0 = any free port (default 8000)")
    p.add_argument("--grpc-port", type=_port, default=8001, help="0 = any free port (default 8001)")
    p.add_argument("--metrics-port", type=_port, default=8002, help="0 = any free port (default 8002)")
    p.add_argument(
        "--model",
        dest="model_names",
        action="append",
        default=None,
        metavar="NAME",
        help="load only this model (repeatable; default: every folder holding a config.pbtxt)",
    )
    p.add_argument(
        "--model-config-name",
        default="",
        metavar="NAME",
        help="load each model's configs/NAME.pbtxt where it has one (gpu: KIND_GPU instances; default: config.pbtxt)",
    )


def settings_from_args(args: argparse.Namespace) -> TritonSettings:
    kwargs = {"models": args.models} if args.models is not None else {}
    return TritonSettings(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        models_to_load=tuple(args.model_names) if args.model_names else None,
        model_config_name=args.model_config_name,
        **kwargs,
    )


def serve(settings: TritonSettings) -> None:
    """Start, print one line with the addresses, serve until SIGINT/SIGTERM, stop."""
    # The handlers only set a flag: an exception raised from a handler could land inside an import or
    # a gevent callback (where it is printed, or turned into ImportError) or cut stop() short.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = TritonServer(settings)
    try:
        server.start()
        if not server.wait_ready(cancel=stop):
            return
        print(
            f"triton ready: grpc={server.grpc_url} http={server.http_url} metrics={server.metrics_url} "
            f"models={','.join(server.models)} log={server.log_path}",
            flush=True,
        )
        while not stop.wait(0.5):
            if server.poll() is not None:
                raise server._failure(f"tritonserver exited with status {server.poll()} while serving")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m kinema.tritonserver", description="Serve a model repository with Triton Inference Server."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve(settings_from_args(args))
    except KinemaError as e:
        print(f"kinema.tritonserver: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
