"""Distillation as a job: StartDistillation's checks, its record, the one-per-teacher claim, and the Celery task that
trains a LADD student (`kinema.train.ladd.train`), stores it and loads it into Triton.

The job machinery is the orchestrator's, reused rather than written again: a distillation's record is a
`kinema.orchestrator.v1.Job` in its own `JobStore` namespace (`RECORD_PREFIX`, so the orchestrator's ListJobs never
shows one), whose `request` is a `PipelineRequest` with pipeline "distill", the resolved `StartDistillationRequest`
in `options` and the teacher in `models`; `DistillationRunner` is the orchestrator's `JobRunner` with another `_make`,
so retries (UNAVAILABLE: the store or Triton down), cancellation, progress and the final record writes are the same
code. `distillation_message` turns a record into the `kinema.distill.v1.Distillation` clients see.

What every job that trains and loads a model shares (settings, claims, loading into Triton, storing, restoring) is
`kinema.orchestration.model_jobs`. One distillation per teacher weights at a time: its claim is the teacher's
(`ModelClaims`: the teacher's sha256, or its name when its config pins no weights hash); a start that finds it held by
a live job answers ALREADY_EXISTS naming that job.

The task runs in the orchestrator's job worker (`services.orchestrator.worker`), on its own Celery queue `distill`
(the worker consumes it by default; `--queues=distill` dedicates a worker). It needs the teacher's weights in process
(LADD backpropagates through the teacher), so it reads the model repository the worker has (`KINEMA_MODELS`) and checks
them against the weights Triton serves; teacher latents and checkpoints go to `KINEMA_DISTILL_DIR`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from kinema.common.v1 import common_pb2
from kinema.distill.v1 import distill_pb2 as dpb
from kinema.errors import AlreadyExists, FailedPrecondition, InvalidInput, KinemaError, NotFound
from kinema.orchestration import model_jobs
from kinema.orchestration.model_jobs import ModelJobs, ModelJobSettings, TrainingRunner, as_dict, card_json
from kinema.orchestration.worker import JobCancelled, JobTask
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.storage.artifacts import Provenance

if TYPE_CHECKING:
    from celery import Celery

    from kinema.jobs.celery_app import KinemaTask
    from kinema.orchestration.settings import OrchestratorSettings

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
# name -> JSON `model_jobs.loaded_entry`), for the distill service's ListModels and to load them again
# (`model_jobs.ModelRestorer`).
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
WEIGHTS_FILE = "1/mmdit.safetensors"  # a student's weights in its model folder


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


def record_request(spec: DistillationSpec, teacher: common_pb2.ModelInfo) -> pb.PipelineRequest:
    """The PipelineRequest a distillation's Job record carries: the resolved request and the teacher served."""
    return model_jobs.record_request(PIPELINE, spec.to_request(), "teacher", teacher)


def read_record(job: pb.Job) -> tuple[DistillationSpec, common_pb2.ModelInfo]:
    request, teacher = model_jobs.read_record(job, dpb.StartDistillationRequest, "teacher")
    return DistillationSpec.from_request(request), teacher


def distillation_message(job: pb.Job) -> dpb.Distillation:
    """The client's view of a distillation record (`Distillation`); outputs become the student, metrics, artifacts."""
    spec, teacher = read_record(job)
    request = spec.to_request()
    request.name = spec.student_name(job.id)
    message = dpb.Distillation(id=job.id, state=job.state, request=request, teacher=teacher, attempts=job.attempts,
                               cancel_requested=job.cancel_requested)  # fmt: skip
    return model_jobs.fill_job_message(message, job, dpb.DistillationError, "student")


class DistillJobs(ModelJobs):
    """The distill service's side of distillation jobs: records, teacher claims and the Celery app that sends them."""

    prefix, task, queue = RECORD_PREFIX, DISTILL_TASK, DISTILL_QUEUE

    def claimed(self, job: pb.Job) -> common_pb2.ModelInfo:
        return read_record(job)[1]

    def start(self, tenant: str, spec: DistillationSpec, teacher: common_pb2.ModelInfo) -> pb.Job:
        """Record, claim the teacher and queue; AlreadyExists (the running id in metadata) while it is claimed."""

        def busy(holder: str) -> AlreadyExists:
            return AlreadyExists(
                f"teacher {teacher.name!r} (weights {teacher.sha256[:12] or '?'}) is being distilled by {holder}; "
                "watch it with GetDistillation, or cancel it first",
                reason="DISTILLATION_RUNNING", field="teacher", metadata={"distillation_id": holder},
            )  # fmt: skip

        return self._start(tenant, record_request(spec, teacher), claim_ttl(spec), busy)

    def students(self) -> list[str]:
        """Names of the students distillations loaded into Triton (it may have dropped some since: a restart)."""
        return self.loaded(STUDENTS_KEY)


def job_settings(environ: Mapping[str, str] = os.environ) -> ModelJobSettings:
    """The distill service's job settings; its stored students are loaded back every KINEMA_STUDENT_RESTORE_SECONDS."""
    return ModelJobSettings.from_env(RESTORE_ENV, environ)


def claim_ttl(spec: DistillationSpec) -> int:
    return int(spec.max_seconds) + CLAIM_MARGIN_SECONDS


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


class DistillationRunner(TrainingRunner):
    """The orchestrator's JobRunner for distillation records: `_make` trains, stores and loads a student."""

    prefix, registry_key = RECORD_PREFIX, STUDENTS_KEY

    def claimed(self, job: pb.Job) -> common_pb2.ModelInfo:
        return read_record(job)[1]

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
            self._progress(tenant, job_id, attempt, done, total, started, teacher, claim_ttl(spec))

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
        model_py = (self.settings.service.models_dir / spec.teacher / "1" / "model.py").read_bytes()

        def provenance(served: common_pb2.ModelInfo) -> Provenance:
            from kinema.pipelines.student import StudentFacts

            facts = StudentFacts.from_parameters(self._runner().describe(served.name, served.version).parameters)
            params = json.loads(served.params_json or "{}") | (facts.params() if facts else {})  # as the service lists
            student = common_pb2.ModelInfo(name=served.name, version=served.version, sha256=served.sha256,
                                           params_json=json.dumps(params, sort_keys=True))  # fmt: skip
            card = card_json(export / WEIGHTS_FILE)
            metrics = {k: card[k] for k in ("steps_done", "samples_seen", "train_seconds", "last_losses", "probe")
                       if k in card}  # fmt: skip
            parameters = {
                "request": as_dict(spec.to_request()) | {"name": export.name},
                "metrics": metrics,
                "student": as_dict(student),
                "models": {"teacher": {"name": teacher.name, "version": teacher.version},
                           "student": {"name": student.name, "version": student.version}},
                "distillation_id": job_id,
            }  # fmt: skip
            return Provenance(pipeline=PIPELINE, parameters=parameters, seed=spec.seed,
                              models={"student": served.sha256}
                              | ({"teacher": teacher.sha256} if teacher.sha256 else {}))  # fmt: skip

        return self._publish(export, WEIGHTS_FILE, model_py, tenant, job_id, provenance)[1]

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
    "STUDENTS_KEY",
    "DistillJobs",
    "DistillationRunner",
    "DistillationSpec",
    "distillation_message",
    "job_settings",
    "record_request",
    "register_distillation",
]
