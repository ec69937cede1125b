"""The distributed shape on one machine: `kinema stack up | status | down`.

`up` starts, as processes on 127.0.0.1, what a cluster runs: redis-server, a real S3 server (SeaweedFS), Triton over
the model repository, the model services, the orchestrator's Celery worker and the orchestrator. It starts them with
the launchers the tests use (`RedisServer`, `S3Server`, `TritonServer`, `ServiceProcess`, `CeleryWorker`), each in a
session of its own so that it outlives the command and the terminal, each logging to `<run-dir>/logs/<name>.log`.
It waits until each is healthy and records them in `<run-dir>/stack.json`, which `status` and `down` read; `down`
stops exactly the recorded process groups.

Two things keep `down` from stopping anything else or leaving anything behind:

- The state file is rewritten (atomically) as each component starts, not only at the end: an `up` that is killed
  half-way leaves a record `down` can stop.
- Each process is recorded with its start time (`/proc/<pid>/stat`): a pid the kernel has since given to another
  process is never signalled. A process group id is not reused while any member of the group lives, so the members
  of a group whose leader is gone are still the stack's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kinema.errors import InvalidInput, KinemaError, Unavailable
from kinema.processes import free_ports, group_alive, kill_group, read_tail, wait_until
from kinema.repository import default_models_dir

_LOGGER = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("runs/stack")
DEFAULT_PORT = 50050  # the orchestrator's; every other component takes a free port
HOST = "127.0.0.1"
STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"
STATE_VERSION = 1
BUCKET = "kinema"
WORKER_APP = "services.orchestrator.worker:app"
WORKER_NAME = "kinema-stack"
MODEL_SERVICES = ("text_encoder", "autoencoder", "denoiser", "distill", "depth", "interpret")
COMPONENTS = ("redis", "s3", "triton", *MODEL_SERVICES, "worker", "orchestrator")  # the order `up` records them in
# `down` stops the callers before what they call, each tier at once: the orchestrator and worker finish or fail
# their calls while the model services still answer; Triton, S3 and Redis go last.
STOP_TIERS = (("orchestrator", "worker"), MODEL_SERVICES, ("triton", "s3", "redis"))
LOG_TAIL_LINES = 30
PROBE_TIMEOUT = 2.0  # s each health probe of `status` may take


class AlreadyRunning(KinemaError):
    """A stack recorded in this run folder is still running (or another `kinema stack` command holds it)."""


@dataclass(frozen=True)
class StackSettings:
    """Where the run folder is, the orchestrator's port (0 = any free port), which models Triton serves."""

    run_dir: Path = DEFAULT_RUN_DIR
    port: int = DEFAULT_PORT
    models: Path = field(default_factory=default_models_dir)
    startup_timeout: float = 120.0  # s each component may take to become healthy
    worker_concurrency: int = 2  # jobs one worker runs at once (threads pool), as `services.orchestrator.worker`

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "models", Path(self.models))
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"port must be between 0 and 65535 (0 = any free port), got {self.port}")
        if not self.startup_timeout > 0:
            raise InvalidInput(f"startup_timeout must be > 0, got {self.startup_timeout}")
        if self.worker_concurrency < 1:
            raise InvalidInput(f"worker_concurrency must be >= 1, got {self.worker_concurrency}")


@dataclass(frozen=True)
class Component:
    """One recorded process group: its leader's pid (= the group id), start time, address, log and health probe."""

    name: str
    pid: int
    start_time: int  # clock ticks since boot (/proc/<pid>/stat field 22): tells this process from a later one
    address: str
    log: str
    probe: str  # "redis", "s3", "triton", "grpc" or "celery": how `status` asks it whether it is healthy


@dataclass
class StackState:
    """What `<run-dir>/stack.json` holds."""

    run_dir: str
    state: str  # "starting" while `up` runs, then "up"
    created: str
    orchestrator: str = ""
    redis_url: str = ""
    s3: dict[str, str] = field(default_factory=dict)  # endpoint, bucket, access_key, secret_key, ports
    triton: dict[str, Any] = field(default_factory=dict)  # grpc, http, metrics, models
    metrics: dict[str, str] = field(default_factory=dict)  # each service's and the worker's Prometheus endpoint
    components: list[Component] = field(default_factory=list)
    version: int = STATE_VERSION

    def component(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StackState:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["components"] = [Component(**c) for c in data.get("components", [])]
        return cls(**fields)


@dataclass(frozen=True)
class ComponentStatus:
    component: Component
    state: str  # "up", "unhealthy" (running, not answering its probe) or "dead"


# -- processes ------------------------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """Start time of live process `pid` in clock ticks since boot; None if there is none (or only a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _leader(c: Component) -> str:
    """`ours` (the recorded process runs), `gone` (no such process) or `other` (the pid now names another)."""
    started = process_start_time(c.pid)
    if started is None:
        return "gone"
    return "ours" if started == c.start_time else "other"


def is_running(c: Component) -> bool:
    """Whether anything of the recorded process group is left."""
    leader = _leader(c)
    if leader == "other":
        return False  # the pid was reused, which the kernel does only once nothing of our group is left
    return leader == "ours" or group_alive(c.pid)


def stop_component(c: Component, timeout: float, grace: float = 2.0) -> bool:
    """SIGTERM to the recorded leader, SIGKILL to its group after `timeout` s; True when nothing of it is left.

    SIGTERM goes to the leader alone, as the launchers send it: tritonserver ends its backend stubs itself, weed and
    celery their children. Whatever of the group outlives the leader by `grace` s gets SIGKILL.
    """
    if _leader(c) == "other":
        return True
    if _leader(c) == "ours":
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.pid, signal.SIGTERM)
        if not wait_until(lambda: _leader(c) != "ours", timeout):
            _LOGGER.warning("%s (group %d) still running %g s after SIGTERM; killing it", c.name, c.pid, timeout)
            kill_group(c.pid, signal.SIGKILL)
            wait_until(lambda: _leader(c) != "ours", 5.0)
    if _leader(c) == "other":
        return True
    if not wait_until(lambda: not group_alive(c.pid), grace):
        kill_group(c.pid, signal.SIGKILL)
        wait_until(lambda: not group_alive(c.pid), 5.0)
    return not is_running(c)


# -- the state file -------------------------------------------------------------------------------


def state_path(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_FILE


def read_state(run_dir: Path) -> StackState | None:
    """The recorded stack of `run_dir`, or None if there is none."""
    path = state_path(run_dir)
    try:
        data = json.loads(path.read_text())
        return StackState.from_json(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InvalidInput(
            f"cannot read {path} ({e}); stop its processes by hand (their pids are in it), then remove it"
        ) from None


def write_state(state: StackState) -> None:
    """Replace the state file whole (a reader never sees half of it); only its owner may read it (S3 secret key)."""
    path = state_path(Path(state.run_dir))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold the run folder: one `up` or `down` at a time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"another `kinema stack` command is working on {run_dir}; wait for it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- up -------------------------------------------------------------------------------------------


class StackFailed(Unavailable):
    """A component did not become healthy; the message names it and holds the tail of its log."""

    def __init__(self, name: str, problem: str, log: Path) -> None:
        tail = read_tail(log, LOG_TAIL_LINES)
        message = f"{name} {problem}"
        if tail:
            message += f" (log: {log})\n--- last {len(tail)} lines of {log} ---\n" + "\n".join(tail)
        super().__init__(message, reason="STACK_COMPONENT_FAILED")
        self.component = name


def _s3_credentials(path: Path) -> tuple[str, str]:
    """The S3 keys this run folder's data was written with: made once, kept beside the data (owner-only)."""
    try:
        data = json.loads(path.read_text())
        return data["access_key"], data["secret_key"]
    except FileNotFoundError:
        pass
    keys = {"access_key": "kinema-" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(24)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f)
    return keys["access_key"], keys["secret_key"]


def _require_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise Unavailable(f"the orchestrator's port {HOST}:{port} is taken ({e.strerror}); pass --port") from None


class _Launch:
    """The components of one `up` as they start, with their launchers: recorded, and stopped again on failure."""

    def __init__(self, settings: StackSettings, run_dir: Path, report: Callable[[str], None]) -> None:
        self.settings = settings
        self.logs = run_dir / "logs"
        self.data = run_dir / "data"
        self.report = report
        self.state = StackState(run_dir=str(run_dir), state="starting", created=datetime.now(UTC).isoformat())
        self.launchers: list[tuple[str, Any]] = []  # (name, object with stop()), in start order

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def record(self, name: str, launcher: Any, pid: int, address: str, probe: str) -> None:
        start = process_start_time(pid)
        self.launchers.append((name, launcher))
        if start is None:  # it exited at once; wait_* reports why
            return
        c = Component(name=name, pid=pid, start_time=start, address=address, log=str(self.log(name)), probe=probe)
        self.state.components.append(c)
        write_state(self.state)

    def start(self, name: str, launch: Callable[[], Any]) -> None:
        try:
            launch()
        except KinemaError as e:
            raise StackFailed(name, f"did not start: {_first_line(e)}", self.log(name)) from None

    def wait(self, name: str, ready: Callable[[], Any], started: float) -> None:
        try:
            ready()
        except (KinemaError, RuntimeError) as e:
            raise StackFailed(name, f"did not become healthy: {_first_line(e)}", self.log(name)) from None
        self.report(f"  {name} ready ({time.monotonic() - started:.1f} s)")

    def run(self, port: int) -> None:
        from kinema.jobs.celery_app import CeleryWorker, WorkerSettings
        from kinema.jobs.redis_server import RedisServer, RedisSettings
        from kinema.orchestration.settings import ENV_VARS as ORCHESTRATOR_VARS
        from kinema.rpc.process import REPO, SERVED_MODELS, ServiceProcess
        from kinema.storage.artifacts import ENV_ACCESS_KEY, ENV_SECRET_KEY
        from kinema.storage.s3server import S3Server, S3ServerSettings
        from kinema.tritonserver import TritonServer, TritonSettings

        s, timeout = self.settings, self.settings.startup_timeout
        if self.logs.is_dir():  # the launchers append: keep the last run's logs apart, for its post-mortem
            previous = self.logs.with_name("logs.previous")
            shutil.rmtree(previous, ignore_errors=True)
            self.logs.rename(previous)
        self.logs.mkdir(parents=True)
        t0 = time.monotonic()
        self.report("starting redis, s3 and triton")
        redis_settings = RedisSettings(host=HOST, data_dir=self.data / "redis", startup_timeout=timeout)
        redis = RedisServer(redis_settings, log_path=self.log("redis"))
        access_key, secret_key = _s3_credentials(self.data / "s3-credentials.json")
        s3_settings = S3ServerSettings(data_dir=self.data / "s3", host=HOST, access_key=access_key,
                                       secret_key=secret_key, startup_timeout=timeout)  # fmt: skip
        s3 = S3Server(s3_settings, log_path=self.log("s3"))
        triton_settings = TritonSettings(models=s.models, host=HOST, http_port=0, grpc_port=0, metrics_port=0,
                                         models_to_load=SERVED_MODELS, startup_timeout=timeout)  # fmt: skip
        triton = TritonServer(triton_settings, log_path=self.log("triton"))
        # One after another, each recorded before the next: a failed start leaves nothing unrecorded.
        self.start("redis", redis.start)
        self.record("redis", redis, redis.pid, redis.url, "redis")
        self.start("s3", s3.start)
        self.record("s3", s3, s3.pid, s3.endpoint, "s3")
        self.start("triton", triton.start)
        self.record("triton", triton, triton.pid, triton.grpc_url, "triton")
        self.state.redis_url = redis.url
        s3_ports = {k: str(v) for k, v in s3.resolved_settings.ports.items()}
        self.state.s3 = {"endpoint": s3.endpoint, "bucket": BUCKET, "access_key": access_key,
                         "secret_key": secret_key} | {f"{k}_port": v for k, v in s3_ports.items()}  # fmt: skip
        self.state.triton = {"grpc": triton.grpc_url, "http": triton.http_url, "metrics": triton.metrics_url,
                             "models": list(SERVED_MODELS)}  # fmt: skip
        write_state(self.state)
        self.wait("redis", redis.wait_ready, t0)
        self.wait("s3", s3.wait_ready, t0)

        backend = {"KINEMA_BACKEND": "triton", "KINEMA_TRITON_URL": triton.grpc_url}
        # The distill and interpret services record their jobs (distillations, fittings) in Redis and load the
        # models those stored back into a restarted Triton from the artifact store (docs/distill.md, docs/interpret.md).
        store = {"KINEMA_REDIS_URL": redis.url, "KINEMA_ARTIFACTS": f"s3://{BUCKET}?endpoint={s3.endpoint}",
                 ENV_ACCESS_KEY: access_key, ENV_SECRET_KEY: secret_key}  # fmt: skip
        jobs = {"distill": store, "interpret": store}
        services = {name: ServiceProcess(name, self.logs, log_name=f"{name}.log", detached=True,
                                         **backend | jobs.get(name, {}))
                    for name in MODEL_SERVICES}  # fmt: skip
        # The environment the orchestrator and its worker share, as tests/orchestrator/conftest.py `jobs_env`: the
        # address of each model service the orchestrator calls, the KINEMA_<NAME>_URL its settings read (distill's
        # students and edit_video's depth included; interpret has clients of its own only), as the chart does.
        urls = {f"KINEMA_{name.upper()}_URL": p.address for name, p in services.items()}
        env = {var: address for var, address in urls.items() if var in ORCHESTRATOR_VARS.values()}
        env |= {"KINEMA_ARTIFACTS": f"s3://{BUCKET}?endpoint={s3.endpoint}", "KINEMA_REDIS_URL": redis.url,
                ENV_ACCESS_KEY: access_key, ENV_SECRET_KEY: secret_key, "OMP_NUM_THREADS": "1"}  # fmt: skip
        # The worker needs only Redis to start: it comes up while Triton loads its models. Its /metrics
        # (kinema.jobs.metrics) is on a port of its own, as every service's.
        worker_metrics = free_ports(HOST, 1)[0]
        worker_env = env | {"KINEMA_METRICS_PORT": str(worker_metrics)}
        # A distillation or fitting job reads the served model it builds on from the repository Triton serves, trains
        # in the stack's data folder and loads the new model into Triton.
        worker_env |= {"KINEMA_MODELS": str(s.models), "KINEMA_TRITON_URL": triton.grpc_url,
                       "KINEMA_DISTILL_DIR": str(self.data / "distill")}  # fmt: skip
        worker_settings = WorkerSettings(app=WORKER_APP, broker_url=redis.url, backend_url=redis.url,
                                         concurrency=s.worker_concurrency, name=WORKER_NAME, pythonpath=(REPO,),
                                         env=worker_env, startup_timeout=timeout)  # fmt: skip
        worker = CeleryWorker(worker_settings, log_path=self.log("worker"))
        t_worker = time.monotonic()
        self.start("worker", worker.start)
        self.state.metrics["worker"] = f"http://{HOST}:{worker_metrics}/metrics"
        self.record("worker", worker, worker.pid, worker.node, "celery")

        self.wait("triton", triton.wait_ready, t0)
        t1 = time.monotonic()
        for name, proc in services.items():
            proc.launch()
            self.state.metrics[name] = f"http://{HOST}:{proc.metrics_port}/metrics"
            self.record(name, proc, proc.proc.pid, proc.address, "grpc")
        for name, proc in services.items():
            self.wait(name, lambda proc=proc: proc.wait_healthy(timeout), t1)

        orchestrator = ServiceProcess("orchestrator", self.logs, port=port, log_name="orchestrator.log", detached=True,
                                      **env)  # fmt: skip
        t2 = time.monotonic()
        orchestrator.launch()
        self.state.metrics["orchestrator"] = f"http://{HOST}:{orchestrator.metrics_port}/metrics"
        self.record("orchestrator", orchestrator, orchestrator.proc.pid, orchestrator.address, "grpc")
        self.state.orchestrator = orchestrator.address
        write_state(self.state)
        self.wait("worker", worker.wait_ready, t_worker)
        self.wait("orchestrator", lambda: orchestrator.wait_healthy(timeout), t2)

        for name, launcher in self.launchers:  # none died while the others started
            if launcher_exited(launcher):
                raise StackFailed(name, "exited while the others started", self.log(name))
        self.state.state = "up"
        write_state(self.state)

    def stop(self) -> None:
        for name, launcher in reversed(self.launchers):
            try:
                launcher.stop()
            except (KinemaError, OSError) as e:
                _LOGGER.warning("stopping %s: %s", name, str(e).splitlines()[0])


def _first_line(e: Exception) -> str:
    """The summary line of a launcher's error, without the log path StackFailed adds anyway."""
    return re.sub(r" \(log: [^)]*\)$", "", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def launcher_exited(launcher: Any) -> bool:
    proc = getattr(launcher, "proc", None)  # ServiceProcess
    return proc.poll() is not None if proc is not None else launcher.poll() is not None


def up(settings: StackSettings, report: Callable[[str], None] = _LOGGER.info) -> StackState:
    """Start the stack, wait until every component is healthy, record it; on failure stop what started and raise.

    Raises `AlreadyRunning` if a stack recorded in the run folder is still running, `StackFailed` (naming the
    component, with the tail of its log) if a component does not become healthy.
    """
    run_dir = settings.run_dir.resolve()
    with _locked(run_dir):
        previous = read_state(run_dir)
        if previous is not None:
            running = [c.name for c in previous.components if is_running(c)]
            if running:
                where = f" (orchestrator {previous.orchestrator})" if previous.orchestrator else ""
                raise AlreadyRunning(
                    f"a stack from {run_dir} is already running{where}: {', '.join(running)}; "
                    "`kinema stack down` stops it"
                )
            report(f"removing the record of a stack that is no longer running ({state_path(run_dir)})")
            _forget(previous)
        port = settings.port or free_ports(HOST, 1)[0]
        _require_free(port)
        launch = _Launch(settings, run_dir, report)
        try:
            launch.run(port)
        except BaseException:
            report("stopping what was started")
            launch.stop()
            survivors = [c for c in launch.state.components if not stop_component(c, 10.0)]
            if not survivors:
                state_path(run_dir).unlink(missing_ok=True)
            raise
        return launch.state


# -- status and down ------------------------------------------------------------------------------


def _probe_grpc(c: Component, state: StackState) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(c.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def _probe_redis(c: Component, state: StackState) -> bool:
    import redis

    client = redis.Redis.from_url(c.address, socket_connect_timeout=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT)
    with contextlib.closing(client):
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False


def _probe_s3(c: Component, state: StackState) -> bool:
    try:
        urllib.request.urlopen(f"http://{c.address}/", timeout=PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:
        pass  # any HTTP answer is S3 answering: it refuses anonymous requests
    except OSError:
        return False
    return True


def _probe_triton(c: Component, state: StackState) -> bool:
    for model in state.triton.get("models", []):
        try:
            url = f"http://{state.triton['http']}/v2/models/{model}/ready"
            urllib.request.urlopen(url, timeout=PROBE_TIMEOUT).close()
        except OSError:  # HTTPError (not ready) included
            return False
    return True


def _probe_celery(c: Component, state: StackState) -> bool:
    from kombu.exceptions import OperationalError

    from kinema.jobs.celery_app import make_celery

    redis = state.component("redis")
    if redis is None or not _probe_redis(redis, state):
        return False  # without its broker the worker cannot answer, and a ping would wait for Redis
    app = make_celery(state.redis_url, state.redis_url)
    try:
        replies = app.control.ping(destination=[c.address], timeout=PROBE_TIMEOUT / 2)
    except OperationalError:
        return False
    finally:
        app.close()
    return any(c.address in reply for reply in replies)


# How `status` asks each kind of component whether it is healthy (`Component.probe`).
PROBES: dict[str, Callable[[Component, StackState], bool]] = {
    "grpc": _probe_grpc,
    "redis": _probe_redis,
    "s3": _probe_s3,
    "triton": _probe_triton,
    "celery": _probe_celery,
}


def status(run_dir: Path) -> tuple[StackState, list[ComponentStatus]] | None:
    """Each recorded component: up, unhealthy (running, not answering) or dead; None if no stack is recorded."""
    state = read_state(Path(run_dir).resolve())
    if state is None:
        return None
    result = []
    for c in state.components:
        if not is_running(c):
            result.append(ComponentStatus(c, "dead"))
        else:
            probe = PROBES.get(c.probe)
            if probe is None:
                raise InvalidInput(f"unknown probe {c.probe!r} of {c.name} in {state_path(Path(state.run_dir))}")
            result.append(ComponentStatus(c, "up" if probe(c, state) else "unhealthy"))
    return state, result


def _forget(state: StackState) -> None:
    """Remove what a stopped stack leaves: weed's sockets in /tmp and the state file."""
    from kinema.storage.s3server import remove_sockets

    ports = [int(v) for k, v in state.s3.items() if k.endswith("_port")]
    if ports:
        remove_sockets(ports)
    state_path(Path(state.run_dir)).unlink(missing_ok=True)


def down(run_dir: Path, timeout: float = 15.0, report: Callable[[str], None] = _LOGGER.info) -> StackState | None:
    """Stop exactly the recorded processes, callers first; remove the state file. None if no stack is recorded.

    Raises `Unavailable` (and keeps the state file) if a process survives SIGKILL.
    """
    run_dir = Path(run_dir).resolve()
    with _locked(run_dir):
        state = read_state(run_dir)
        if state is None:
            return None
        survivors: list[str] = []
        recorded = {c.name: c for c in state.components}
        tiers = [[recorded.pop(n) for n in tier if n in recorded] for tier in STOP_TIERS]
        tiers.append(list(recorded.values()))  # anything a newer `up` recorded that this one does not know
        for tier in tiers:
            if not tier:
                continue
            t0 = time.monotonic()
            with ThreadPoolExecutor(len(tier)) as pool:
                stopped = list(pool.map(lambda c: stop_component(c, timeout), tier))
            for c, gone in zip(tier, stopped, strict=True):
                if gone:
                    report(f"  stopped {c.name} (pid {c.pid}, {time.monotonic() - t0:.1f} s)")
                else:
                    survivors.append(f"{c.name} (group {c.pid})")
        if survivors:
            raise Unavailable(f"still running after SIGKILL: {', '.join(survivors)}; {state_path(run_dir)} is kept")
        _forget(state)
        return state
