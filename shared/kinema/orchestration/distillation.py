"""Distillation as a job: StartDistillation's checks, its record, the one-per-teacher claim, and the Celery task that
trains a LADD student (`kinema.train.ladd.train`), stores it and loads it into Triton.

The job machinery is the orchestrator's, reused rather than written again: a distillation's record is a
`kinema.orchestrator.v1.Job` in its own `JobStore` namespace (`RECORD_PREFIX`, so the orchestrator's ListJobs never
shows one), whose `request` is a `PipelineRequest` with pipeline "distill", the resolved `StartDistillationRequest`
in `options` and the teacher in `models`; `DistillationRunner` is the orchestrator's `JobRunner` with another `_make`,
so retries (UNAVAILABLE: the store or Triton down), cancellation, progress and the final record writes are the same
code. `distillation_message` turns a record into the `kinema.distill.v1.Distillation` clients see.

One distillation per teacher weights at a time: `TeacherClaims` holds `<prefix>:running:<teacher sha256>` (a
teacher whose config pins no weights hash: `name:<name>`) =
"<tenant>:<id>" (Redis SET NX), refreshed by progress and released when the job ends; a start that finds it held by a
live job answers ALREADY_EXISTS naming that job; a holder whose record has ended (a worker lost mid-run) is replaced.

The task runs in the orchestrator's job worker (`services.orchestrator.worker`), on its own Celery queue `distill`
(the worker consumes it by default; `--queues=distill` dedicates a worker). It needs the teacher's weights in process
(LADD backpropagates through the teacher), so it reads the model repository the worker has (`KINEMA_MODELS`) and checks
them against the weights Triton serves; teacher latents and checkpoints go to `KINEMA_DISTILL_DIR`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from kinema.common.v1 import common_pb2
from kinema.distill.v1 import distill_pb2 as dpb
from kinema.errors import AlreadyExists, FailedPrecondition, InvalidInput, KinemaError, NotFound, Unavailable
from kinema.orchestration.jobs import TERMINAL, JobStore, check_job_id
from kinema.orchestration.worker import JobCancelled, JobRunner, JobTask
from kinema.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from celery import Celery

    from kinema.inference.runner import TritonRunner
    from kinema.jobs.celery_app import KinemaTask
    from kinema.orchestration.settings import OrchestratorSettings
    from kinema.storage.artifacts import ArtifactStore

_LOGGER = logging.getLogger(__name__)

DISTILL_TASK = "kinema.distill.run_distillation"
DISTILL_QUEUE = "distill"
PIPELINE = "distill"  # Job.request.pipeline of a distillation's record
RECORD_PREFIX = "kinema-distill"  # JobStore prefix of the records and the teacher claims
DEFAULT_TEACHER = "denoiser"
TEACHER_FAMILY = "denoiser"  # a teacher is the denoiser or one of its variants (and never a student)
PROGRESS_EVERY = 1.0  # s between two progress writes (the last step is always written)
# A claim outlives its job's budget by this much unless refreshed; ended holders are replaced at once anyway.
CLAIM_MARGIN_SECONDS = 6 * 3600
_NAME = re.compile(r"denoiser_[a-z0-9_]{1,48}")
# Triton's repository index lists only the models of its repository folders, not the ones loaded with files (an
# override load), and forgets those when it restarts. The students distillations loaded are kept here (a hash:
# name -> JSON `student_entry`), for the distill service's ListModels and to load them again (`StudentRestorer`).
STUDENTS_KEY = f"{RECORD_PREFIX}:students"
RESTORE_ENV = "KINEMA_STUDENT_RESTORE_SECONDS"

# field -> (lowest, highest, default for 0)
LIMITS: dict[str, tuple[float, float, float]] = {
    "student_steps": (1, 8, 4),
    "train_steps": (1, 100_000, 1000),
    "max_seconds": (0, 6 * 3600, 1800),  # lowest excluded
    "teacher_samples": (1, 8192, 1024),
    "batch": (1, 256, 32),
    "eval_prompts": (0, 1000, 0),
}
MEDIA_TYPES = {"weights": "application/vnd.safetensors", "card": "text/markdown", "config": "text/plain"}


@dataclass(frozen=True)
class DistillationSpec:
    """A StartDistillationRequest with its defaults resolved and its ranges checked."""

    teacher: str
    teacher_version: str
    student_steps: int
    train_steps: int
    max_seconds: float
    teacher_samples: int
    batch: int
    seed: int
    name: str  # "" until the id is known: `student_name`
    eval_prompts: int

    @classmethod
    def from_request(cls, request: dpb.StartDistillationRequest) -> DistillationSpec:
        """InvalidInput (reason OUT_OF_RANGE or INVALID_NAME) naming the first field out of its range."""
        values: dict[str, Any] = {}
        for name, (low, high, default) in LIMITS.items():
            value = getattr(request, name)
            if name != "eval_prompts" and value == 0:
                value = default
            ok = (low < value <= high) if name == "max_seconds" else (low <= value <= high)
            if not ok or value != value:
                bound = f"in ({low:g}, {high:g}]" if name == "max_seconds" else f"in {low:g}..{high:g}"
                raise InvalidInput(f"{name} must be {bound} (0: {default:g}), got {value:g}", reason="OUT_OF_RANGE",
                                   field=name, metadata={"min": f"{low:g}", "max": f"{high:g}"})  # fmt: skip
            values[name] = value
        if request.name and not _NAME.fullmatch(request.name):
            raise InvalidInput(f"name must be 'denoiser_' followed by 1-48 of a-z, 0-9, '_', got {request.name!r:.80}",
                               reason="INVALID_NAME", field="name")  # fmt: skip
        from kinema.rpc.models import check_version

        check_version(request.teacher.version, "teacher.version")
        return cls(teacher=request.teacher.name or DEFAULT_TEACHER, teacher_version=request.teacher.version,
                   seed=request.seed, name=request.name, **values)  # fmt: skip

    def to_request(self) -> dpb.StartDistillationRequest:
        return dpb.StartDistillationRequest(
            teacher=common_pb2.ModelRef(name=self.teacher, version=self.teacher_version),
            student_steps=self.student_steps, train_steps=self.train_steps, max_seconds=self.max_seconds,
            teacher_samples=self.teacher_samples, batch=self.batch, seed=self.seed, name=self.name,
            eval_prompts=self.eval_prompts,
        )  # fmt: skip

    def student_name(self, job_id: str) -> str:
        return self.name or f"denoiser_ladd_{job_id[:12]}"


def check_teacher(name: str) -> None:
    """NotFound unless `name` is of the denoiser family (the only networks LADD distils)."""
    if name != TEACHER_FAMILY and not name.startswith(TEACHER_FAMILY + "_"):
        raise NotFound(f"teacher {name!r} is not a denoiser model; the denoiser service's ListModels shows them",
                       reason="MODEL_NOT_FOUND", field="teacher.name")  # fmt: skip


# -- records ----------------------------------------------------------------------------------------


def _dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def record_request(spec: DistillationSpec, teacher: common_pb2.ModelInfo) -> pb.PipelineRequest:
    """The PipelineRequest a distillation's Job record carries: the resolved request and the teacher served."""
    request = pb.PipelineRequest(pipeline=PIPELINE)
    request.options.update({"request": _dict(spec.to_request()), "teacher": _dict(teacher)})
    request.models["teacher"].CopyFrom(common_pb2.ModelRef(name=teacher.name, version=teacher.version))
    return request


def read_record(job: pb.Job) -> tuple[DistillationSpec, common_pb2.ModelInfo]:
    options = json_format.MessageToDict(job.request.options, preserving_proto_field_name=True)
    request = json_format.ParseDict(options.get("request", {}), dpb.StartDistillationRequest())
    teacher = json_format.ParseDict(options.get("teacher", {}), common_pb2.ModelInfo())
    return DistillationSpec.from_request(request), teacher


def distillation_message(job: pb.Job) -> dpb.Distillation:
    """The client's view of a distillation record (`Distillation`); outputs become the student, metrics, artifacts."""
    spec, teacher = read_record(job)
    request = spec.to_request()
    request.name = spec.student_name(job.id)
    message = dpb.Distillation(id=job.id, state=job.state, request=request, teacher=teacher, attempts=job.attempts,
                               cancel_requested=job.cancel_requested)  # fmt: skip
    for name in ("progress", "created_at", "started_at", "finished_at"):
        if job.HasField(name):
            getattr(message, name).CopyFrom(getattr(job, name))
    if job.HasField("error"):
        message.error.CopyFrom(dpb.DistillationError(code=job.error.code, message=job.error.message,
                                                     detail=job.error.detail))  # fmt: skip
    for output in job.outputs:
        message.artifacts.append(output.artifact)
        parameters = json_format.MessageToDict(output.provenance.parameters)
        if output.index == 0:  # the weights: their provenance holds the metrics and the loaded student
            message.metrics.update(parameters.get("metrics", {}))
            student = parameters.get("student", {})
            message.student.CopyFrom(json_format.ParseDict(student, common_pb2.ModelInfo()))
    return message


@dataclass(frozen=True)
class DistillJobSettings:
    """What the distill service needs for distillation jobs, from the orchestrator's variables of the same meaning:
    KINEMA_REDIS_URL (records, claims, Celery results and cancel flags; "" = jobs off), KINEMA_BROKER_URL,
    KINEMA_JOB_RETENTION_SECONDS; and, to load stored students again after Triton dropped them, the artifact store
    (KINEMA_ARTIFACTS and its S3 keys) and KINEMA_STUDENT_RESTORE_SECONDS (how often to look; 0 = never)."""

    redis_url: str = field(default="", repr=False)
    broker_url: str = field(default="", repr=False)
    retention_seconds: int = 7 * 86400
    artifacts: str = ""
    s3_access_key: str = field(default="", repr=False)
    s3_secret_key: str = field(default="", repr=False)
    restore_seconds: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DistillJobSettings:
        from kinema.orchestration.settings import _CHECKS, ENV_VARS

        values: dict[str, Any] = {}
        for name, ours in (("redis_url", "redis_url"), ("broker_url", "broker_url"),
                           ("job_retention_seconds", "retention_seconds")):  # fmt: skip
            raw = (environ.get(ENV_VARS[name]) or "").strip()
            if not raw:
                continue
            parse, check, must = _CHECKS[name]
            try:
                value = parse(raw)
            except ValueError:
                value = None
            if value is None or not check(value):
                raise ValueError(f"{ENV_VARS[name]}: must be {must}")
            values[ours] = value
        if values.get("broker_url") and not values.get("redis_url"):
            raise ValueError(f"{ENV_VARS['broker_url']} needs {ENV_VARS['redis_url']} (records live there)")
        from kinema.storage.artifacts import ENV_ACCESS_KEY, ENV_SECRET_KEY

        values["artifacts"] = (environ.get(ENV_VARS["artifacts"]) or "").strip()
        values["s3_access_key"] = environ.get(ENV_ACCESS_KEY, "")
        values["s3_secret_key"] = environ.get(ENV_SECRET_KEY, "")
        raw = (environ.get(RESTORE_ENV) or "").strip()
        if raw:
            try:
                values["restore_seconds"] = float(raw)
            except ValueError:
                values["restore_seconds"] = -1.0
            if not 0 <= values["restore_seconds"] <= 86400:
                raise ValueError(f"{RESTORE_ENV}: must be seconds between 0 (never) and 86400, got {raw!r}")
        return cls(**values)


class DistillJobs:
    """The distill service's side of distillation jobs: records, teacher claims and the Celery app that sends them."""

    def __init__(self, settings: DistillJobSettings) -> None:
        self.store = JobStore(settings.redis_url, retention_seconds=settings.retention_seconds, prefix=RECORD_PREFIX)
        self.claims = TeacherClaims(self.store)
        self.app = distillation_app(settings.redis_url, settings.broker_url, settings.retention_seconds)

    def start(self, tenant: str, spec: DistillationSpec, teacher: common_pb2.ModelInfo) -> pb.Job:
        """Record, claim the teacher and queue; AlreadyExists (the running id in metadata) while it is claimed."""
        from kinema.jobs.celery_app import redis_errors_as_unavailable

        job, _ = self.store.create(tenant, record_request(spec, teacher))
        try:
            holder = self.claims.claim(teacher, tenant, job.id, claim_ttl(spec))
        except BaseException:
            self.store.delete(tenant, job.id)
            raise
        if holder:
            self.store.delete(tenant, job.id)  # never a record of a start that was refused
            raise AlreadyExists(
                f"teacher {teacher.name!r} (weights {teacher.sha256[:12] or '?'}) is being distilled by {holder}; "
                "watch it with GetDistillation, or cancel it first",
                reason="DISTILLATION_RUNNING", field="teacher", metadata={"distillation_id": holder},
            )  # fmt: skip
        try:
            with redis_errors_as_unavailable(self.app):
                enqueue_distillation(self.app, job)
        except BaseException:
            with contextlib.suppress(KinemaError):
                self.claims.release(teacher, tenant, job.id)
                self.store.delete(tenant, job.id)
            raise
        return job

    def get(self, tenant: str, job_id: str) -> pb.Job:
        return self.store.get(tenant, check_job_id(job_id))

    def students(self) -> list[str]:
        """Names of the students distillations loaded into Triton (it may have dropped some since: a restart)."""
        with self.store._errors():
            return sorted(self.store.redis.hkeys(STUDENTS_KEY))

    def cancel(self, tenant: str, job_id: str) -> pb.Job:
        """As the orchestrator's CancelJob: the Celery cancel flag and revoke, then the record's change."""
        from kinema.jobs.celery_app import cancel, redis_errors_as_unavailable

        job = self.get(tenant, job_id)
        if job.state in TERMINAL:
            return job
        with redis_errors_as_unavailable(self.app):
            cancel(self.app, job.id)
        job = self.store.request_cancel(tenant, job.id)
        if job.state in TERMINAL:  # cancelled while queued: no worker will release its teacher
            self.claims.release(read_record(job)[1], tenant, job.id)
        return job

    def close(self) -> None:
        self.store.close()


def student_entry(tenant: str, job_id: str, artifacts: Mapping[str, str] | None = None, backend: str = "") -> str:
    """A student's STUDENTS_KEY value: who distilled it and, once stored, the sha256 of its weights, card and config
    in the artifact store with the python-backend file Triton runs it with: all a restore needs."""
    entry: dict[str, Any] = {"tenant": tenant, "distillation_id": job_id}
    if artifacts:
        entry |= {"artifacts": dict(artifacts), "backend": backend}
    return json.dumps(entry, sort_keys=True)


class StudentRestorer:
    """Loads the recorded students Triton no longer serves (it restarted, or a pod was replaced) back into it, from
    the artifact store, with the files the distillation loaded; the distill service runs `restore` every
    KINEMA_STUDENT_RESTORE_SECONDS. Triton checks the weights against the config's weights_sha256 as it loads."""

    def __init__(self, jobs: DistillJobs, runner: TritonRunner, store: ArtifactStore) -> None:
        self.jobs, self.runner, self.store = jobs, runner, store

    def restore(self) -> list[str]:
        """Load every recorded, stored student Triton does not serve; returns the names loaded. A student whose
        artifacts are gone, or that Triton refuses, is logged and left for the next round; Triton or the store
        unreachable raises Unavailable."""
        with self.jobs.store._errors():
            entries = self.jobs.store.redis.hgetall(STUDENTS_KEY)
        loaded = []
        for name, raw in sorted(entries.items()):
            entry = json.loads(raw)
            if "artifacts" not in entry or self.runner.ready(name):
                continue
            try:
                self._load(name, entry)
            except (NotFound, FailedPrecondition) as e:
                _LOGGER.warning("student not restored", extra={"model": name, "error": str(e)})
                continue
            loaded.append(name)
            _LOGGER.info("student restored into Triton", extra={"model": name})
        return loaded

    def start(self, seconds: float) -> threading.Event:
        """Run `restore` now and then every `seconds` in a daemon thread, until the returned event is set."""
        stop = threading.Event()

        def loop() -> None:
            while True:
                try:
                    self.restore()
                except KinemaError as e:  # Triton, Redis or the store down: the next round tries again
                    _LOGGER.warning("student restore round failed", extra={"error": str(e)})
                except Exception:
                    _LOGGER.exception("student restore round failed")
                if stop.wait(seconds):
                    return

        threading.Thread(target=loop, name="student-restore", daemon=True).start()
        return stop

    def _load(self, name: str, entry: dict) -> None:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        tenant, shas = entry["tenant"], entry["artifacts"]
        blobs = {kind: self.store.get(shas[kind], tenant) for kind in ("weights", "card", "config")}  # hash-checked
        config = text_format.Parse(blobs["config"].decode("utf-8"), model_config_pb2.ModelConfig())
        self.runner.load(name, json_format.MessageToJson(config, preserving_proto_field_name=True),
                         {"file:1/mmdit.safetensors": blobs["weights"], "file:1/model.py": entry["backend"].encode(),
                          "file:README.md": blobs["card"]})  # fmt: skip


def record_store(settings: OrchestratorSettings) -> JobStore:
    return JobStore(settings.redis_url, retention_seconds=settings.job_retention_seconds,
                    max_attempts=settings.job_max_attempts, prefix=RECORD_PREFIX)  # fmt: skip


class TeacherClaims:
    """Which distillation holds each teacher: `<prefix>:running:<sha256>` = "<tenant>:<id>" (see the module doc)."""

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
    _REFRESH = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
    )

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self._release = jobs.redis.register_script(self._RELEASE)
        self._refresh = jobs.redis.register_script(self._REFRESH)

    def key(self, teacher: common_pb2.ModelInfo) -> str:
        return f"{self.jobs.prefix}:running:{teacher.sha256 or 'name:' + teacher.name}"

    def _live(self, holder: str) -> bool:
        tenant, _, job_id = holder.partition(":")
        try:
            return self.jobs.get(tenant, job_id).state not in TERMINAL
        except NotFound:
            return False
        except InvalidInput:  # not a holder this code wrote
            return False

    def claim(self, teacher: common_pb2.ModelInfo, tenant: str, job_id: str, ttl: int) -> str:
        """Take the teacher for job `job_id`: "" when taken, else the id of the live distillation holding it."""
        key, holder = self.key(teacher), f"{tenant}:{job_id}"
        with self.jobs._errors():
            for _ in range(5):
                if self.jobs.redis.set(key, holder, nx=True, ex=ttl):
                    return ""
                current = self.jobs.redis.get(key)
                if current is None:
                    continue  # released meanwhile
                if self._live(current):
                    return current.partition(":")[2]
                self._release(keys=[key], args=[current])  # an ended holder (a lost worker's job): replace it
        raise Unavailable("could not claim the teacher (its claim changed hands five times); retry", reason="BUSY")

    def refresh(self, teacher: common_pb2.ModelInfo, tenant: str, job_id: str, ttl: int) -> None:
        with self.jobs._errors():
            self._refresh(keys=[self.key(teacher)], args=[f"{tenant}:{job_id}", ttl])

    def release(self, teacher: common_pb2.ModelInfo, tenant: str, job_id: str) -> None:
        with self.jobs._errors():
            self._release(keys=[self.key(teacher)], args=[f"{tenant}:{job_id}"])


def claim_ttl(spec: DistillationSpec) -> int:
    return int(spec.max_seconds) + CLAIM_MARGIN_SECONDS


def job_queues(default: str) -> tuple:
    """The job app's queues: the default one (pipeline jobs) and `distill`, bound to one exchange. Every app that sends
    or consumes distillations must declare them alike: a queue Celery makes up on the fly gets an exchange of its own,
    and Redis drops what is published there."""
    from kombu import Exchange, Queue

    exchange = Exchange(default, type="direct")
    return (Queue(default, exchange, routing_key=default), Queue(DISTILL_QUEUE, exchange, routing_key=DISTILL_QUEUE))


def distillation_app(redis_url: str, broker_url: str = "", retention_seconds: int = 7 * 86400) -> Celery:
    """A Celery app that sends distillations and cancels them (the distill service's); workers run `make_job_app`'s."""
    from kinema.jobs.celery_app import make_celery

    app = make_celery(broker_url or redis_url, redis_url, main="kinema-orchestrator", result_expires=retention_seconds)
    app.conf.task_queues = job_queues(app.conf.task_default_queue)
    return app


def enqueue_distillation(app: Celery, job: pb.Job) -> None:
    """Send the job to the workers' `distill` queue; the Celery task id is the job id (as `worker.enqueue`)."""
    app.send_task(DISTILL_TASK, args=(job.tenant, job.id), task_id=job.id, queue=DISTILL_QUEUE, ignore_result=True)


# -- the task -------------------------------------------------------------------------------------------


def student_config(teacher_dir: Path, name: str, steps: int, teacher: common_pb2.ModelInfo, weights_sha256: str):
    """The student's Triton ModelConfig, derived from its teacher's config.pbtxt as `models/denoiser_4step`'s is."""
    from tritonclient.grpc import model_config_pb2

    from kinema.inference.model_config import read_config

    config = read_config(teacher_dir)
    config.name = name
    del config.instance_group[:]  # a student runs a few evaluations where its teacher runs dozens: one instance
    config.instance_group.add(count=1, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    params = {"network": config.parameters["network"].string_value if "network" in config.parameters else "denoiser",
              "weights": "mmdit.safetensors", "student_steps": str(steps), "guidance": "1", "teacher": teacher.name,
              "teacher_sha256": teacher.sha256, "weights_sha256": weights_sha256}  # fmt: skip
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


class DistillationRunner(JobRunner):
    """The orchestrator's JobRunner for distillation records: `_make` trains, stores and loads a student."""

    def __init__(self, settings: OrchestratorSettings) -> None:
        super().__init__(settings)
        self.jobs.close()
        self.jobs = record_store(settings)
        self.claims = TeacherClaims(self.jobs)
        self._triton = None

    def run(self, task: KinemaTask, tenant: str, job_id: str) -> str:
        try:
            return super().run(task, tenant, job_id)
        finally:  # a job that ended (not one waiting for its retry) gives its teacher back
            try:
                job = self.jobs.get(tenant, job_id)
                if job.state in TERMINAL:
                    self.claims.release(read_record(job)[1], tenant, job_id)
            except KinemaError:
                _LOGGER.warning("could not release the teacher claim of %s", job_id, exc_info=True)

    def _runner(self):
        from kinema.inference.runner import TritonRunner
        from kinema.rpc.tls import internal_credentials

        with self._lock:
            if self._triton is None:
                self._triton = TritonRunner(self.settings.service.triton_url, timeout=600.0,
                                            credentials=internal_credentials(self.settings.service))  # fmt: skip
            return self._triton

    def _make(self, task: KinemaTask, job: pb.Job, attempt: int, started: float) -> list[pb.Output]:
        from kinema.train import ladd

        tenant, job_id = job.tenant, job.id
        spec, teacher = read_record(job)
        name = spec.student_name(job_id)
        models = self.settings.service.models_dir
        work = self.settings.distill_path / "jobs" / job_id
        check_teacher(spec.teacher)
        last = [0.0]

        def progress(stage: str, done: int, total: int) -> None:
            if self._cancelled(task):
                raise JobCancelled
            if stage != "train" or (done < total and time.monotonic() - last[0] < PROGRESS_EVERY):
                return
            last[0] = time.monotonic()
            try:
                self.jobs.progress(tenant, job_id, attempt, done, total, time.monotonic() - started)
                self.claims.refresh(teacher, tenant, job_id, claim_ttl(spec))
            except Unavailable:  # a missed progress report is not worth the job
                _LOGGER.warning("could not record progress", exc_info=True)

        if self._cancelled(task):
            raise JobCancelled
        export = work / "export" / name
        if not (export / "config.pbtxt").is_file():  # else a retry after the training finished: store and load again
            cfg = ladd.LADDConfig(student_steps=spec.student_steps, teacher_samples=spec.teacher_samples,
                                  batch=spec.batch, steps=spec.train_steps, seed=spec.seed,
                                  checkpoint_every=max(1, min(100, spec.train_steps)), log_every=10)  # fmt: skip
            self._check_teacher_weights(models, spec.teacher, teacher)
            _, ema = ladd.train(cfg, work / "run", models, self.settings.distill_path / "teacher-data",
                                max_seconds=spec.max_seconds, teacher=spec.teacher, progress=progress)  # fmt: skip
            card = ladd.run_card(cfg, work / "run") | {"teacher": spec.teacher, "distillation_id": job_id}
            if spec.eval_prompts:
                card["probe"] = ladd.quick_accuracy(ema, models, spec.eval_prompts, spec.student_steps)
            if self._cancelled(task):
                raise JobCancelled
            self._export(ladd, ema, export, models, spec, teacher, card)
        if self._cancelled(task):
            raise JobCancelled  # nothing stored, nothing loaded after a cancel
        return self._store_and_load(export, spec, teacher, tenant, job_id)

    @staticmethod
    def _check_teacher_weights(models: Path, name: str, teacher: common_pb2.ModelInfo) -> None:
        from kinema.repository import model_parameters

        try:
            pinned = model_parameters(models, name).get("weights_sha256", "")
        except (KinemaError, OSError, ValueError) as e:
            raise FailedPrecondition(f"the worker's model repository {models} has no teacher {name!r}: {e}",
                                     reason="TEACHER_NOT_IN_REPOSITORY") from None  # fmt: skip
        if teacher.sha256 and pinned and pinned != teacher.sha256:
            raise FailedPrecondition(
                f"the worker's model repository holds other weights of {name!r} ({pinned[:12]}) than Triton serves "
                f"({teacher.sha256[:12]}); point KINEMA_MODELS at the repository Triton serves",
                reason="TEACHER_MISMATCH",
            )

    @staticmethod
    def _export(ladd, ema, export: Path, models: Path, spec: DistillationSpec, teacher: common_pb2.ModelInfo,
                card: dict) -> None:  # fmt: skip
        """The student's model folder: weights, card (with its weights_sha256 row), config.pbtxt last (the marker)."""
        from kinema.inference.model_card import write_sha256
        from kinema.inference.model_config import format_config
        from kinema.nn.checkpoint import sha256_file

        request = json_format.MessageToJson(spec.to_request(), preserving_proto_field_name=True, indent=None)
        command = "kinema.distill.v1.Distill/StartDistillation " + shlex.quote(request)
        weights = ladd.export_student(ema, export.parent, export.name, card, command)
        sha = sha256_file(weights)
        write_sha256(export, sha)
        config = student_config(models / spec.teacher, export.name, spec.student_steps, teacher, sha)
        tmp = export / "config.pbtxt.tmp"
        tmp.write_text(format_config(config))
        tmp.replace(export / "config.pbtxt")

    def _store_and_load(self, export: Path, spec: DistillationSpec, teacher: common_pb2.ModelInfo, tenant: str,
                        job_id: str) -> list[pb.Output]:  # fmt: skip
        """Store weights, card and config (index 0, 1, 2), then load the student into Triton and describe it."""
        from kinema.inference.model_config import read_config
        from kinema.orchestration.outputs import artifact_ref, provenance_message
        from kinema.storage.artifacts import Provenance, store_from_uri

        s = self.settings
        with self._lock:
            if self._store is None:
                self._store = store_from_uri(s.artifacts, s.s3_access_key or None, s.s3_secret_key or None)
        config = read_config(export)
        sha = config.parameters["weights_sha256"].string_value
        files = {
            "weights": (export / "1" / "mmdit.safetensors").read_bytes(),
            "card": (export / "README.md").read_bytes(),
            "config": (export / "config.pbtxt").read_bytes(),
        }
        model_py = (s.service.models_dir / spec.teacher / "1" / "model.py").read_bytes()
        # Load first: the stored student is then one Triton accepted, and its ModelInfo is the served one.
        runner = self._runner()
        runner.load(export.name, json_format.MessageToJson(config, preserving_proto_field_name=True),
                    {"file:1/mmdit.safetensors": files["weights"], "file:1/model.py": model_py,
                     "file:README.md": files["card"]})  # fmt: skip
        served = runner.describe(export.name)
        with self.jobs._errors():
            self.jobs.redis.hset(STUDENTS_KEY, export.name, student_entry(tenant, job_id))
        if served.sha256 != sha:
            raise FailedPrecondition(f"Triton serves {export.name!r} with weights {served.sha256[:12]}, not the "
                                     f"distilled {sha[:12]}", reason="MODEL_LOAD_MISMATCH")  # fmt: skip
        from kinema.pipelines.student import StudentFacts

        facts = StudentFacts.from_parameters(served.parameters)
        params = json.loads(served.params_json or "{}") | (facts.params() if facts else {})  # as the service lists it
        student = common_pb2.ModelInfo(name=served.name, version=served.version, sha256=served.sha256,
                                       params_json=json.dumps(params, sort_keys=True))  # fmt: skip
        card = json.loads(_card_json(export))
        metrics = {k: card[k] for k in ("steps_done", "samples_seen", "train_seconds", "last_losses", "probe")
                   if k in card}  # fmt: skip
        parameters = {
            "request": _dict(spec.to_request()) | {"name": export.name},
            "metrics": metrics,
            "student": _dict(student),
            "models": {"teacher": {"name": teacher.name, "version": teacher.version},
                       "student": {"name": student.name, "version": student.version}},
            "distillation_id": job_id,
        }  # fmt: skip
        provenance = Provenance(
            pipeline=PIPELINE,
            parameters=parameters,
            seed=spec.seed,
            models={"student": sha} | ({"teacher": teacher.sha256} if teacher.sha256 else {}),
        )
        outputs = []
        for index, kind in enumerate(("weights", "card", "config")):
            artifact = self._store.put(files[kind], MEDIA_TYPES[kind], provenance, tenant)
            output = pb.Output(index=index, artifact=artifact_ref(artifact), seed=spec.seed)
            if artifact.provenance is not None:
                output.provenance.CopyFrom(provenance_message(artifact.provenance))
            outputs.append(output)
        stored = {kind: o.artifact.sha256 for kind, o in zip(("weights", "card", "config"), outputs, strict=True)}
        with self.jobs._errors():  # what a restore loads again, should Triton drop the student
            self.jobs.redis.hset(STUDENTS_KEY, export.name,
                                 student_entry(tenant, job_id, stored, model_py.decode("utf-8")))  # fmt: skip
        _LOGGER.info("student stored and loaded", extra={"model": student.name, "sha256": sha})
        return outputs


def _card_json(export: Path) -> str:
    """The card dict the exported weights carry in their metadata (`export_student`)."""
    from safetensors import safe_open

    with safe_open(str(export / "1" / "mmdit.safetensors"), framework="pt") as f:
        return f.metadata()["card"]


def register_distillation(app: Celery, settings: OrchestratorSettings) -> None:
    """Register the distillation task on the job app (`make_job_app` calls this)."""
    runner = DistillationRunner(settings)

    @app.task(bind=True, base=JobTask, name=DISTILL_TASK, runner=runner, max_retries=settings.job_max_retries,
              autoretry_for=())  # fmt: skip
    def run_distillation(self: JobTask, tenant: str, job_id: str) -> str:
        return self.runner.run(self, tenant, job_id)


__all__ = [
    "DISTILL_QUEUE",
    "DISTILL_TASK",
    "DistillJobSettings",
    "DistillJobs",
    "DistillationRunner",
    "DistillationSpec",
    "StudentRestorer",
    "TeacherClaims",
    "distillation_app",
    "distillation_message",
    "enqueue_distillation",
    "job_queues",
    "record_request",
    "register_distillation",
]
