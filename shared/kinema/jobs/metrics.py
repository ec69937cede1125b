"""Prometheus metrics of a Celery worker's jobs, counted from Celery's task signals, on the worker's `/metrics`.

`serve_worker_metrics(app, settings)` (services/orchestrator/worker.py calls it) connects to the task signals of
`app` and, once a worker starts in this process (`worker_init`: never in a process that only imports the app, such
as `celery inspect`), serves the registry on `settings.host:settings.metrics_port` — `KINEMA_HOST` and
`KINEMA_METRICS_PORT`, the variables every service's `/metrics` uses; port 0 serves nothing.

Families, by `pipeline` (an orchestrator job's `request.pipeline`, read from its record as the run starts; any other
task: its task name):

- `kinema_worker_jobs_started_total{pipeline}`: runs begun; a job retried by message (Celery's `retry`) starts again.
- `kinema_worker_jobs_finished_total{pipeline,outcome}`: runs ended, `outcome` one of `OUTCOMES`: succeeded, failed,
  cancelled, retried (a transient error; Celery sent the job back to the queue) or skipped (a redelivered job whose
  record had already ended: the run changes nothing).
- `kinema_worker_job_retries_total{pipeline}`: transient errors after which the job waits and tries again, in its run
  (the orchestrator's jobs, `kinema.jobs.celery_app.job_retried`) or by message (`task_retry`).
- `kinema_worker_job_seconds{pipeline,outcome}`: wall time of a run (histogram).
- `kinema_worker_jobs_in_progress{pipeline}`: runs going on now.

The counts live in the process that runs the tasks: the threads and solo pools (threads is the default) run them in
the worker's own process. Under the prefork pool they run in child processes, whose counts this endpoint does not
see; the worker logs a warning then.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.signals import task_failure, task_postrun, task_prerun, task_retry, worker_init, worker_shutdown
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kinema.errors import KinemaError
from kinema.jobs.celery_app import job_retried
from kinema.rpc.metrics import MetricsEndpoint, serve_metrics
from kinema.rpc.settings import ServiceSettings

_LOGGER = logging.getLogger(__name__)

OUTCOMES = ("succeeded", "failed", "cancelled", "retried", "skipped")
# Jobs run from seconds (a few sampling steps) to an hour (long videos).
JOB_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
# The states a job's record ends in (kinema.orchestrator.v1 JobState names); a run over one of them is a no-op.
ENDED = ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")


@dataclass(frozen=True)
class RunLabel:
    """What a task run is labelled with: its pipeline, and whether its job had already ended before it started."""

    pipeline: str
    ended: bool = False


def job_label(task: Task, args: tuple, kwargs: dict) -> RunLabel:
    """The pipeline of an orchestrator job, from its record; any other task is labelled with its name.

    The job task (`kinema.orchestration.worker`) takes `(tenant, job_id)` and carries its `runner`, whose `jobs`
    store reads the record. A record that cannot be read (gone, Redis away) labels the run `unknown`.
    """
    store = getattr(getattr(task, "runner", None), "jobs", None)
    if store is None or len(args) != 2:
        return RunLabel(task.name)
    try:
        job = store.get(*args)
    except (KinemaError, ValueError):
        return RunLabel("unknown")
    state = type(job).DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[job.state].name
    return RunLabel(job.request.pipeline or "unknown", ended=state in ENDED)


def outcome(state: str, retval: Any) -> str:
    """The outcome of a finished run from Celery's final state and, for a job, the state its record ended in."""
    if state == "RETRY":
        return "retried"
    if state in ("IGNORED", "REVOKED"):  # KinemaTask ignores a job cancelled before it ran
        return "cancelled"
    if state != "SUCCESS":
        return "failed"
    if isinstance(retval, str):  # the job task returns the name of the state the job's record ended in
        if retval.endswith("FAILED"):
            return "failed"
        if retval.endswith("CANCELLED"):
            return "cancelled"
        if retval == "GONE":
            return "skipped"
    return "succeeded"


class WorkerMetrics:
    """The worker's metric families (one registry) and the signal handlers that count one Celery app's tasks."""

    def __init__(
        self,
        app: Celery,
        registry: CollectorRegistry | None = None,
        label: Callable[[Task, tuple, dict], RunLabel] = job_label,
    ) -> None:
        self.app, self.label = app, label
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.started = Counter(
            "kinema_worker_jobs_started", "Job runs begun (a retried job starts again).", ["pipeline"],
            registry=self.registry,
        )  # fmt: skip
        self.finished = Counter(
            "kinema_worker_jobs_finished", "Job runs ended, by outcome.", ["pipeline", "outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.seconds = Histogram(
            "kinema_worker_job_seconds", "Wall time of a job run.", ["pipeline", "outcome"], buckets=JOB_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.retries = Counter(
            "kinema_worker_job_retries", "Transient errors after which a job waits and tries again.", ["pipeline"],
            registry=self.registry,
        )  # fmt: skip
        self.in_progress = Gauge(
            "kinema_worker_jobs_in_progress", "Job runs going on now.", ["pipeline"], registry=self.registry
        )
        self._runs: dict[str, tuple[RunLabel, float, str | None]] = {}  # task id -> label, start, outcome so far
        self._lock = threading.Lock()
        self.endpoint: MetricsEndpoint | None = None

    def _ours(self, task: Any) -> bool:
        return isinstance(task, Task) and task.app is self.app

    # -- signal handlers (Celery logs and swallows what a handler raises; these raise nothing) ----------------------

    def on_prerun(self, sender: Any = None, task_id: str = "", args: tuple = (), kwargs: dict | None = None,
                  **_: Any) -> None:  # fmt: skip
        if not self._ours(sender):
            return
        try:
            label = self.label(sender, tuple(args or ()), dict(kwargs or {}))
        except Exception:  # a label is not worth a job
            _LOGGER.warning("could not label a job run for its metrics", exc_info=True)
            label = RunLabel("unknown")
        with self._lock:
            self._runs[task_id] = (label, time.monotonic(), "skipped" if label.ended else None)
        self.started.labels(label.pipeline).inc()
        self.in_progress.labels(label.pipeline).inc()

    def _mark(self, task_id: str, result: str) -> None:
        with self._lock:
            if task_id in self._runs:
                label, started, seen = self._runs[task_id]
                self._runs[task_id] = (label, started, seen or result)

    def on_retry(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        if self._ours(sender) and request is not None:
            self._mark(request.id, "retried")
            self.on_job_retried(sender, request)

    def on_job_retried(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        if not self._ours(sender) or request is None:
            return
        with self._lock:
            run = self._runs.get(request.id)
        self.retries.labels(run[0].pipeline if run is not None else "unknown").inc()

    def on_failure(self, sender: Any = None, task_id: str = "", **_: Any) -> None:
        if self._ours(sender):
            self._mark(task_id, "failed")

    def on_postrun(self, sender: Any = None, task_id: str = "", retval: Any = None, state: str = "",
                   **_: Any) -> None:  # fmt: skip
        if not self._ours(sender):
            return
        with self._lock:
            run = self._runs.pop(task_id, None)
        if run is None:
            return
        label, started, seen = run
        result = seen or outcome(state, retval)
        self.in_progress.labels(label.pipeline).dec()
        self.finished.labels(label.pipeline, result).inc()
        self.seconds.labels(label.pipeline, result).observe(time.monotonic() - started)

    # -- the endpoint ------------------------------------------------------------------------------------------

    def connect(self) -> WorkerMetrics:
        """Count this app's task runs in this process (the handlers ignore other apps' tasks)."""
        task_prerun.connect(self.on_prerun, weak=False)
        task_retry.connect(self.on_retry, weak=False)
        job_retried.connect(self.on_job_retried, weak=False)
        task_failure.connect(self.on_failure, weak=False)
        task_postrun.connect(self.on_postrun, weak=False)
        return self

    def disconnect(self) -> None:
        for signal, handler in ((task_prerun, self.on_prerun), (task_retry, self.on_retry),
                                (job_retried, self.on_job_retried), (task_failure, self.on_failure),
                                (task_postrun, self.on_postrun)):  # fmt: skip
            signal.disconnect(handler)

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Serve the registry on host:port (0: any free port, see `.endpoint.port`) until `stop()`."""
        self.endpoint = serve_metrics(self.registry, host, port)
        return self.endpoint

    def stop(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None


def serve_worker_metrics(app: Celery, settings: ServiceSettings) -> WorkerMetrics | None:
    """Count `app`'s job runs; serve them on settings.host:settings.metrics_port once a worker of `app` starts here.

    None (nothing counted or served) when `settings.metrics_port` is 0. A worker that cannot bind the port exits,
    as a service does: a worker Prometheus cannot scrape should not look healthy.
    """
    if not settings.metrics_port:
        return None
    metrics = WorkerMetrics(app).connect()

    def start(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        if "prefork" in str(getattr(sender, "pool_cls", "")).lower():
            _LOGGER.warning("the prefork pool runs jobs in child processes: /metrics shows none of their runs; "
                            "use --pool=threads (the default)")  # fmt: skip
        try:
            endpoint = metrics.serve(settings.host, settings.metrics_port)
        except OSError as e:
            _LOGGER.error("cannot serve /metrics on %s:%d: %s", settings.host, settings.metrics_port, e)
            raise SystemExit(f"cannot serve /metrics on {settings.host}:{settings.metrics_port}: {e}") from None
        _LOGGER.info("worker metrics on http://%s:%d/metrics", settings.host, endpoint.port)

    def stop(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            with contextlib.suppress(OSError):
                metrics.stop()

    worker_init.connect(start, weak=False)
    worker_shutdown.connect(stop, weak=False)
    return metrics


__all__ = ["OUTCOMES", "RunLabel", "WorkerMetrics", "job_label", "outcome", "serve_worker_metrics"]
