"""Celery for Kinema's jobs: Redis as broker and result store, configured once in `make_celery`.

The choices, and why:

- At-least-once delivery: `task_acks_late` with `task_reject_on_worker_lost`, one message prefetched per
  worker process. A job whose worker dies goes back to the queue (after the broker's visibility timeout), so
  jobs must be safe to run twice; `worker_deduplicate_successful_tasks` skips a redelivered job that has
  already succeeded.
- Job state lives in Redis (`result_extended`: name, args, worker and retries too), so an orchestrator that
  restarts finds it again by job id; run redis with a data folder (`RedisServer`) to survive a Redis restart.
- JSON only, never pickle: a message must not be able to run code in the worker.
- The default pool is `threads`, not prefork. RECIPES.md: prefork deadlocks when torch ran in the parent
  before the fork, and a pipeline module imports torch. Threads also keep the worker answering ping and
  revoke while a job runs, which cooperative cancellation relies on. The price: `revoke(terminate=True)`
  cannot kill a thread, so a job that never checks for cancellation runs on. Where a hard kill matters, run
  `--pool=prefork`: `worker_process_init` then sets torch to one thread in each child, and tasks should
  import torch lazily.
- Cancellation = revoke plus a flag in Redis (`cancel`). Jobs call `self.raise_if_cancelled()` between
  steps; the flag reaches prefork children and workers that started after the revoke, which the revoke
  broadcast does not.
- Bounded retries for transient failures: `KinemaTask` retries `kinema.errors.Unavailable` (a dependency
  is down) a few times with jittered exponential backoff, then fails with the last error. The orchestrator's job
  task retries within its run instead (`kinema.orchestration.worker`) and says so with the `job_retried` signal.
- A worker outlives Redis restarts: it reconnects for as long as Redis is away (every 2-30 s), running jobs carry
  on and are acknowledged once Redis is back. The broker connection is `kinema.jobs.broker`'s, which keeps Celery
  5.7 / kombu 5.7 from exiting when the connection drops while a job runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore
from celery.signals import worker_process_init
from celery.utils.dispatch import Signal

from kinema.errors import InvalidInput, Unavailable
from kinema.jobs import broker
from kinema.processes import kill_group, read_tail, stop_group

_LOGGER = logging.getLogger(__name__)

PROGRESS = "PROGRESS"  # the custom state a running job reports with `KinemaTask.progress`
POOLS = ("threads", "prefork", "solo")
DEFAULT_POOL = "threads"
# A job still unacknowledged this long after delivery is handed to another worker: longer than any job may
# run, or it runs twice. The price is that a dead worker's jobs wait this long to come back.
VISIBILITY_TIMEOUT = 6 * 3600.0
RESULT_EXPIRES = 7 * 24 * 3600.0  # s job state and results stay in Redis
CANCEL_KEY = "kinema:cancel:{task_id}"
LOG_TAIL_LINES = 40

# Sent by a task that retries within its run, as Celery's `task_retry` is for a retry by message:
# `job_retried.send(sender=task, request=task.request, reason=exc)`. The worker's metrics count both.
job_retried = Signal(name="job_retried")


class KinemaTask(Task):
    """Base of every Kinema job: progress reports, cooperative cancellation, retries for `Unavailable`."""

    autoretry_for = (Unavailable,)
    max_retries = 3
    retry_backoff = 2  # s: waits of up to 2, 4, 8 s (full jitter) between tries
    retry_backoff_max = 60
    retry_jitter = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.raise_if_cancelled()  # a job cancelled while it waited in the queue never starts
        return super().__call__(*args, **kwargs)

    def progress(self, done: int, total: int, **info: Any) -> None:
        """Report `done` of `total` steps (and any JSON-able `info`) as state PROGRESS, visible to clients."""
        self.update_state(state=PROGRESS, meta={"done": done, "total": total, **info})

    def cancelled(self) -> bool:
        """Whether someone asked this job to stop (`cancel`, or a revoke that reached this process)."""
        task_id = self.request.id
        if task_id is None:
            return False  # called directly, not as a job
        from celery.worker import state

        if task_id in state.revoked:  # threads and solo pools run jobs in the process that got the revoke
            return True
        return bool(_redis(self.app).exists(CANCEL_KEY.format(task_id=task_id)))

    def raise_if_cancelled(self) -> None:
        """End the job as REVOKED if it was cancelled; call it between steps."""
        if self.cancelled():
            self.backend.mark_as_revoked(self.request.id, reason="cancelled", request=self.request)
            raise Ignore()  # the state stays REVOKED and the message is acknowledged: it does not come back


def make_celery(
    broker_url: str | None = None,
    backend_url: str | None = None,
    *,
    main: str = "kinema",
    include: Iterable[str] = (),
    visibility_timeout: float = VISIBILITY_TIMEOUT,
    result_expires: float = RESULT_EXPIRES,
    **conf: Any,
) -> Celery:
    """A Celery app with Kinema's settings (see the module docstring); `conf` overrides any setting.

    None for a URL leaves it to CELERY_BROKER_URL / CELERY_RESULT_BACKEND, which Celery prefers over the
    arguments anyway when they are set (`CeleryWorker` sets them for its worker).
    """
    if not visibility_timeout > 0:
        raise InvalidInput(f"visibility_timeout must be > 0, got {visibility_timeout}")
    app = Celery(
        main, broker=broker_url, backend=backend_url, include=list(include), task_cls=KinemaTask, amqp=broker.NAME
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_deduplicate_successful_tasks=True,
        task_track_started=True,
        result_extended=True,
        result_expires=result_expires,
        worker_pool=DEFAULT_POOL,
        broker_connection_retry_on_startup=True,
        # A worker waits for Redis however long it is away (Celery's default gives up after 100 tries, ~45 min, and
        # exits); on Kubernetes the liveness probe decides when a worker that cannot reach Redis is restarted.
        broker_connection_max_retries=None,
        # On a Redis blip running jobs carry on: their acks are Redis writes that work again after it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            # Look for timed-out jobs this often (kombu's default is once in 100 s).
            "unacked_restore_interval": max(0.5, min(60.0, visibility_timeout / 4)),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5.0,
        },
        redis_socket_connect_timeout=5.0,
        # With Redis down a client's submit or result.get() fails after about 4 s of retries (Celery's default
        # backend policy takes 20), a state query at once; a worker's result write retries as long.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5},
        result_backend_transport_options={
            "retry_policy": {"max_retries": 5, "interval_start": 0, "interval_step": 0.5, "interval_max": 1.0}
        },
    )
    app.conf.update(conf)
    return app


def cancel(app: Celery, task_id: str, *, terminate: bool = False) -> None:
    """Ask job `task_id` to stop: a flag its `raise_if_cancelled` sees, then a revoke to every worker.

    `terminate` also kills the process running it, which only the prefork pool can do (other pools log an
    error and rely on the flag). Cancelling a finished job changes nothing.
    """
    expires = app.conf.result_expires
    seconds = expires.total_seconds() if isinstance(expires, timedelta) else float(expires or RESULT_EXPIRES)
    _redis(app).set(CANCEL_KEY.format(task_id=task_id), 1, ex=max(1, int(seconds)))
    app.control.revoke(task_id, terminate=terminate)


def queue_depth(app: Celery, queue: str | None = None) -> int:
    """Messages waiting in `queue` (default: the app's default queue) for a worker to take them; a job a worker
    holds (running, or waiting for its retry) is not counted. Broker errors propagate (`redis_errors_as_unavailable`).
    """
    from kombu.exceptions import ChannelError

    name = queue or app.conf.task_default_queue
    with app.pool.acquire(block=True) as connection:
        try:
            return connection.default_channel.queue_declare(queue=name, passive=True).message_count
        except ChannelError:  # Redis has no key for an empty queue
            return 0


@contextlib.contextmanager
def redis_errors_as_unavailable(app: Celery) -> Iterator[None]:
    """Raise `Unavailable`, naming Redis and why, when a submit or a state query inside cannot reach it.

    The same outage takes three shapes: kombu's OperationalError (publishing), redis-py's ConnectionError (reading
    state) and Celery's RuntimeError "Retry limit exceeded ... result store" (a submit or get() subscribes to the
    result first). Despite that message the app recovers by itself once Redis is back.
    """
    import redis
    from kombu.exceptions import OperationalError
    from kombu.utils.url import maybe_sanitize_url

    try:
        yield
    except (OperationalError, redis.ConnectionError, redis.TimeoutError, RuntimeError) as e:
        cause = e.__cause__ if isinstance(e, RuntimeError) else e
        if not isinstance(cause, (OperationalError, redis.RedisError, OSError)):
            raise
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        where = maybe_sanitize_url(app.conf.broker_url or "")  # no password in the message
        raise Unavailable(f"the job queue (Redis at {where}) is unreachable: {reason}") from e


def _redis(app: Celery) -> Any:
    client = getattr(app.backend, "client", None)
    if client is None:
        raise InvalidInput(f"cancellation needs the Redis result backend, not {type(app.backend).__name__}")
    return client


@worker_process_init.connect(weak=False)
def _one_torch_thread(**_: Any) -> None:
    """In a freshly forked prefork child: one torch thread, since a thread pool the parent started is gone (RECIPES)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


# -- worker process -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """Which app a `celery worker` runs, against which Redis, with which pool."""

    app: str  # "module:attribute" as `celery -A` takes it; the module calls make_celery()
    broker_url: str
    backend_url: str
    pool: str = DEFAULT_POOL
    concurrency: int = 1
    name: str = ""  # node name before "@host"; "" = kinema-<random>
    queues: tuple[str, ...] = ()  # () = the default queue
    pythonpath: tuple[Path, ...] = ()  # put first on PYTHONPATH, so that `app` imports
    env: Mapping[str, str] = field(default_factory=dict)  # more environment for the worker
    loglevel: str = "INFO"
    startup_timeout: float = 30.0
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "queues", tuple(self.queues))
        object.__setattr__(self, "pythonpath", tuple(Path(p) for p in self.pythonpath))
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if ":" not in self.app:
            raise InvalidInput(f"app must be 'module:attribute', got {self.app!r}")
        if self.pool not in POOLS:
            raise InvalidInput(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.concurrency < 1 or (self.pool == "solo" and self.concurrency != 1):
            raise InvalidInput(f"concurrency must be >= 1 (1 for the solo pool), got {self.concurrency}")
        if "@" in self.name:
            raise InvalidInput(f"name is the part before '@host', got {self.name!r}")
        if not self.startup_timeout > 0:
            raise InvalidInput(f"startup_timeout must be > 0, got {self.startup_timeout}")


class CeleryWorker:
    """One `celery worker` process group: `start()`, `wait_ready()`, `stop()`, or use it as a context manager."""

    def __init__(self, settings: WorkerSettings, log_path: Path | None = None) -> None:
        self.settings = settings
        self.node = f"{settings.name or 'kinema-' + secrets.token_hex(4)}@{socket.gethostname()}"
        self._log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._client: Celery | None = None
        self._stopped = False

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise RuntimeError("the worker has not been started")
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Process id of the worker's main process, which is also its process group id."""
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """The worker's exit status, or None while it runs (or was never started)."""
        return self._proc.poll() if self._proc else None

    def _command(self) -> list[str]:
        s = self.settings
        # "processes" is Celery's other name for prefork: given "prefork", the CLI cannot tell it from its own
        # default and lets the app's worker_pool (threads) win.
        pool = "processes" if s.pool == "prefork" else s.pool
        cmd = [sys.executable, "-m", "celery", "-A", s.app, "worker", f"--pool={pool}"]
        cmd += [f"--concurrency={s.concurrency}", f"--hostname={self.node}", f"--loglevel={s.loglevel}"]
        # No gossip or mingle: nothing here reads other workers' events, and cancellation does not need their
        # revoke lists (the flag in Redis outlives them); mingle alone adds a second to every start.
        cmd += ["--without-gossip", "--without-mingle"]
        if s.queues:
            cmd += ["--queues", ",".join(s.queues)]
        return [*cmd, *s.extra_args]

    def _environment(self) -> dict[str, str]:
        s = self.settings
        env = {**os.environ, **s.env}
        env["CELERY_BROKER_URL"] = s.broker_url
        env["CELERY_RESULT_BACKEND"] = s.backend_url
        env["PYTHONUNBUFFERED"] = "1"  # the log file shows what happened up to a crash
        paths = [str(p.resolve()) for p in s.pythonpath]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*paths, env.get("PYTHONPATH", "")) if p)
        return env

    def start(self) -> None:
        """Launch the worker in a new process group; returns at once (see `wait_ready`)."""
        if self._proc is not None:
            raise RuntimeError("this CeleryWorker was already started; make a new one")
        if self._log_path is None:
            self._log_path = Path(tempfile.mkdtemp(prefix="kinema-celery-")) / "worker.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = self._command()
        _LOGGER.debug("starting %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            start_new_session=True,  # its own process group: stop() ends it and its pool's children
        )

    def wait_ready(self, timeout: float | None = None, cancel: threading.Event | None = None) -> bool:
        """Block until the worker answers a ping by its node name (True) or `cancel` is set (False).

        Raises `Unavailable`, with the tail of the worker log, if it exits or `timeout` s (default:
        settings.startup_timeout) pass first.
        """
        if self._proc is None:
            raise RuntimeError("the worker has not been started")
        from kombu.exceptions import OperationalError

        timeout = self.settings.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if self._client is None:
            self._client = make_celery(self.settings.broker_url, self.settings.backend_url)
        last: Exception | None = None
        while not (cancel and cancel.is_set()):
            status = self._proc.poll()
            if status is not None:
                raise self._failure(f"celery worker exited with status {status} before it answered a ping")
            try:
                replies = self._client.control.ping(destination=[self.node], timeout=0.5)
                if any(self.node in reply for reply in replies):
                    return True
            except OperationalError as e:  # Redis is not reachable
                last = e
                time.sleep(0.2)
            if time.monotonic() > deadline:
                raise self._failure(f"celery worker {self.node} not ready after {timeout:g} s (last: {last})")
        return False

    def _failure(self, summary: str) -> Unavailable:
        tail = self.log_tail()
        lines = [line.strip() for line in tail if line.strip()]
        if any(line.startswith("Error:") for line in lines):
            summary = f"{summary}: {lines[-1]}"  # the command line failed; the last line says why (often an import)
        else:
            # "[2026-01-01 10:00:00,000: ERROR/MainProcess] ..."
            errors = [line for line in lines if "ERROR/" in line or "CRITICAL/" in line]
            if errors:
                summary = f"{summary}: {errors[-1]}"
        return Unavailable(
            f"{summary} (log: {self._log_path})\n--- last {len(tail)} lines of the worker log ---\n" + "\n".join(tail)
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last `lines` lines of the worker log."""
        return read_tail(self._log_path, lines)

    def kill(self) -> None:
        """SIGKILL the whole worker at once, as a crash would: its unacknowledged jobs come back later."""
        if self._proc is not None and not self._stopped and self._proc.poll() is None:
            kill_group(self._proc.pid, signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown (SIGTERM: running jobs finish), SIGKILL to the group after `timeout` s. Idempotent.

        Jobs still running at the kill are not acknowledged, so they return to the queue after the visibility
        timeout.
        """
        proc = self._proc
        if proc is None or self._stopped:
            return  # a second stop must not signal a group id the kernel may have handed out again
        try:
            stop_group(proc, "celery worker", timeout, 2.0)
            self._stopped = True
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._client is not None:
                self._client.close()  # releases its connection pool; does not talk to Redis
                self._client = None

    def __enter__(self) -> CeleryWorker:
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
