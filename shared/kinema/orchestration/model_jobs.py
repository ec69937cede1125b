"""Jobs that train a model and load it into Triton: what distillations (`kinema.orchestration.distillation`) and IIN
fittings (`kinema.orchestration.fitting`) share.

- `ModelJobSettings`: a model service's side of such jobs (Redis for the records, the broker, the artifact store and
  how often to load dropped models back).
- `ModelJobs`: records in a `JobStore` namespace of their own (so the orchestrator's ListJobs never shows one), one
  `ModelClaims` claim per job, and the Celery app that queues them; start, get and cancel.
- `ModelClaims`: `<prefix>:running:<key>` = "<tenant>:<id>" (Redis SET NX), refreshed by progress and released when
  the job ends; a holder whose record has ended (a worker lost mid-run) is replaced.
- `TrainingRunner`: the orchestrator's `JobRunner` whose `_make` trains; `_publish` loads the exported model folder
  into Triton (an override load, with its files), checks the weights Triton serves are the ones trained, stores
  weights, card and config (outputs 0, 1, 2) and records the model under the job kind's registry key.
- `ModelRestorer`: Triton's repository index lists only its repository folders, and a restart forgets the models
  loaded with their files; a service loads the recorded ones back from the artifact store.

The tasks run in the orchestrator's job worker (`services.orchestrator.worker`), each kind on its own Celery queue
(`job_queues`: every worker consumes them all unless started with `--queues`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from kinema.common.v1 import common_pb2
from kinema.errors import FailedPrecondition, InvalidInput, KinemaError, NotFound, Unavailable
from kinema.orchestration.jobs import TERMINAL, JobStore, check_job_id
from kinema.orchestration.worker import JobRunner
from kinema.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from celery import Celery

    from kinema.inference.runner import TritonRunner
    from kinema.orchestration.settings import OrchestratorSettings
    from kinema.storage.artifacts import ArtifactStore, Provenance

_LOGGER = logging.getLogger(__name__)

QUEUES = ("distill", "fit")  # the Celery queues of model jobs, beside the default one of pipeline jobs
MEDIA_TYPES = {"weights": "application/vnd.safetensors", "card": "text/markdown", "config": "text/plain"}
ARTIFACT_KINDS = ("weights", "card", "config")  # a model job's outputs 0, 1, 2


def as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def record_request(pipeline: str, request, role: str, model: common_pb2.ModelInfo) -> pb.PipelineRequest:
    """The PipelineRequest a model job's record carries: its resolved start request and, under `role`, the served model
    it builds on (a teacher, a representation's encoder)."""
    record = pb.PipelineRequest(pipeline=pipeline)
    record.options.update({"request": as_dict(request), role: as_dict(model)})
    record.models[role].CopyFrom(common_pb2.ModelRef(name=model.name, version=model.version))
    return record


def read_record(job: pb.Job, request_type: type, role: str) -> tuple[Any, common_pb2.ModelInfo]:
    """(the start request, the model under `role`) of a record `record_request` wrote."""
    options = json_format.MessageToDict(job.request.options, preserving_proto_field_name=True)
    request = json_format.ParseDict(options.get("request", {}), request_type())
    return request, json_format.ParseDict(options.get(role, {}), common_pb2.ModelInfo())


def fill_job_message(message, job: pb.Job, error_type: type, made: str):
    """Copy what every model job's client message shares from its record: progress and times, the error as
    `error_type`, the artifacts, and from the weights' provenance (output 0) the metrics and the loaded model (the
    provenance parameter and message field `made`: "student", "model")."""
    for name in ("progress", "created_at", "started_at", "finished_at"):
        if job.HasField(name):
            getattr(message, name).CopyFrom(getattr(job, name))
    if job.HasField("error"):
        message.error.CopyFrom(error_type(code=job.error.code, message=job.error.message, detail=job.error.detail))
    for output in job.outputs:
        message.artifacts.append(output.artifact)
        if output.index == 0:
            parameters = json_format.MessageToDict(output.provenance.parameters)
            message.metrics.update(parameters.get("metrics", {}))
            getattr(message, made).CopyFrom(json_format.ParseDict(parameters.get(made, {}), common_pb2.ModelInfo()))
    return message


@dataclass(frozen=True)
class ModelJobSettings:
    """What a model service needs for its model jobs, from the orchestrator's variables of the same meaning:
    KINEMA_REDIS_URL (records, claims, Celery results and cancel flags; "" = jobs off), KINEMA_BROKER_URL,
    KINEMA_JOB_RETENTION_SECONDS; and, to load stored models again after Triton dropped them, the artifact store
    (KINEMA_ARTIFACTS and its S3 keys) and how often to look (`restore_env`, seconds; 0 = never)."""

    redis_url: str = field(default="", repr=False)
    broker_url: str = field(default="", repr=False)
    retention_seconds: int = 7 * 86400
    artifacts: str = ""
    s3_access_key: str = field(default="", repr=False)
    s3_secret_key: str = field(default="", repr=False)
    restore_seconds: float = 30.0

    @classmethod
    def from_env(cls, restore_env: str, environ: Mapping[str, str] = os.environ) -> ModelJobSettings:
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
        raw = (environ.get(restore_env) or "").strip()
        if raw:
            try:
                values["restore_seconds"] = float(raw)
            except ValueError:
                values["restore_seconds"] = -1.0
            if not 0 <= values["restore_seconds"] <= 86400:
                raise ValueError(f"{restore_env}: must be seconds between 0 (never) and 86400, got {raw!r}")
        return cls(**values)

    def artifact_store(self) -> ArtifactStore:
        from kinema.storage.artifacts import store_from_uri

        return store_from_uri(self.artifacts, self.s3_access_key or None, self.s3_secret_key or None)


class ModelClaims:
    """Which job holds each claim: `<prefix>:running:<key>` = "<tenant>:<id>" (see the module doc)."""

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
    _REFRESH = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
    )

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self._release = jobs.redis.register_script(self._RELEASE)
        self._refresh = jobs.redis.register_script(self._REFRESH)

    def key(self, model: common_pb2.ModelInfo) -> str:
        """A model's weights when its config pins them, else its name."""
        return f"{self.jobs.prefix}:running:{model.sha256 or 'name:' + model.name}"

    def _live(self, holder: str) -> bool:
        tenant, _, job_id = holder.partition(":")
        try:
            return self.jobs.get(tenant, job_id).state not in TERMINAL
        except NotFound:
            return False
        except InvalidInput:  # not a holder this code wrote
            return False

    def claim(self, model: common_pb2.ModelInfo, tenant: str, job_id: str, ttl: int) -> str:
        """Take `model` for job `job_id`: "" when taken, else the id of the live job holding it."""
        key, holder = self.key(model), f"{tenant}:{job_id}"
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
        raise Unavailable("could not claim the model (its claim changed hands five times); retry", reason="BUSY")

    def refresh(self, model: common_pb2.ModelInfo, tenant: str, job_id: str, ttl: int) -> None:
        with self.jobs._errors():
            self._refresh(keys=[self.key(model)], args=[f"{tenant}:{job_id}", ttl])

    def release(self, model: common_pb2.ModelInfo, tenant: str, job_id: str) -> None:
        with self.jobs._errors():
            self._release(keys=[self.key(model)], args=[f"{tenant}:{job_id}"])


def job_queues(default: str) -> tuple:
    """The job app's queues: the default one (pipeline jobs) and `QUEUES`, bound to one exchange. Every app that sends
    or consumes model jobs must declare them alike: a queue Celery makes up on the fly gets an exchange of its own,
    and Redis drops what is published there."""
    from kombu import Exchange, Queue

    exchange = Exchange(default, type="direct")
    return (Queue(default, exchange, routing_key=default),
            *(Queue(name, exchange, routing_key=name) for name in QUEUES))  # fmt: skip


def model_jobs_app(redis_url: str, broker_url: str = "", retention_seconds: int = 7 * 86400) -> Celery:
    """A Celery app that sends model jobs and cancels them (a model service's); workers run `make_job_app`'s."""
    from kinema.jobs.celery_app import make_celery

    app = make_celery(broker_url or redis_url, redis_url, main="kinema-orchestrator", result_expires=retention_seconds)
    app.conf.task_queues = job_queues(app.conf.task_default_queue)
    return app


class ModelJobs:
    """A model service's side of its jobs: records under `prefix`, claims, and the Celery app that sends them to
    `task` on `queue`. Subclasses say what a record claims (`claimed`)."""

    prefix: str
    task: str
    queue: str

    def __init__(self, settings: ModelJobSettings) -> None:
        self.store = JobStore(settings.redis_url, retention_seconds=settings.retention_seconds, prefix=self.prefix)
        self.claims = ModelClaims(self.store)
        self.app = model_jobs_app(settings.redis_url, settings.broker_url, settings.retention_seconds)

    def claimed(self, job: pb.Job) -> common_pb2.ModelInfo:
        raise NotImplementedError

    def _start(self, tenant: str, request: pb.PipelineRequest, ttl: int, busy: Callable[[str], KinemaError]) -> pb.Job:
        """Record, claim (`claimed`) and queue; `busy(holder id)` is raised while another live job holds the claim."""
        from kinema.jobs.celery_app import redis_errors_as_unavailable

        job, _ = self.store.create(tenant, request)
        claim = self.claimed(job)
        try:
            holder = self.claims.claim(claim, tenant, job.id, ttl)
        except BaseException:
            self.store.delete(tenant, job.id)
            raise
        if holder:
            self.store.delete(tenant, job.id)  # never a record of a start that was refused
            raise busy(holder)
        try:
            with redis_errors_as_unavailable(self.app):
                self.app.send_task(self.task, args=(job.tenant, job.id), task_id=job.id, queue=self.queue,
                                   ignore_result=True)  # fmt: skip
        except BaseException:
            with contextlib.suppress(KinemaError):
                self.claims.release(claim, tenant, job.id)
                self.store.delete(tenant, job.id)
            raise
        return job

    def get(self, tenant: str, job_id: str) -> pb.Job:
        return self.store.get(tenant, check_job_id(job_id))

    def loaded(self, key: str) -> list[str]:
        """Names of the models jobs recorded under `key` loaded into Triton (it may have dropped some since)."""
        with self.store._errors():
            return sorted(self.store.redis.hkeys(key))

    def cancel(self, tenant: str, job_id: str) -> pb.Job:
        """As the orchestrator's CancelJob: the Celery cancel flag and revoke, then the record's change."""
        from kinema.jobs.celery_app import cancel, redis_errors_as_unavailable

        job = self.get(tenant, job_id)
        if job.state in TERMINAL:
            return job
        with redis_errors_as_unavailable(self.app):
            cancel(self.app, job.id)
        job = self.store.request_cancel(tenant, job.id)
        if job.state in TERMINAL:  # cancelled while queued: no worker will release its claim
            self.claims.release(self.claimed(job), tenant, job.id)
        return job

    def close(self) -> None:
        self.store.close()


def loaded_entry(tenant: str, job_id: str, artifacts: Mapping[str, str] | None = None, backend: str = "",
                 weights_file: str = "") -> str:  # fmt: skip
    """A loaded model's registry value: which job made it and, once stored, the sha256 of its weights, card and
    config in the artifact store, the path of the weights in its folder and the python-backend file Triton runs it
    with: all a restore needs."""
    entry: dict[str, Any] = {"tenant": tenant, "job_id": job_id}
    if artifacts:
        entry |= {"artifacts": dict(artifacts), "backend": backend, "weights_file": weights_file}
    return json.dumps(entry, sort_keys=True)


class ModelRestorer:
    """Loads the models recorded under `key` that Triton no longer serves (it restarted, or a pod was replaced)
    back into it, from the artifact store, with the files their job loaded; a model service runs `restore` every
    few seconds. Triton checks the weights against the config's weights_sha256 as it loads."""

    def __init__(self, store: JobStore, key: str, runner: TritonRunner, artifacts: ArtifactStore) -> None:
        self.store, self.key, self.runner, self.artifacts = store, key, runner, artifacts

    def restore(self) -> list[str]:
        """Load every recorded, stored model Triton does not serve; returns the names loaded. A model whose
        artifacts are gone, or that Triton refuses, is logged and left for the next round; Triton or the store
        unreachable raises Unavailable."""
        with self.store._errors():
            entries = self.store.redis.hgetall(self.key)
        loaded = []
        for name, raw in sorted(entries.items()):
            entry = json.loads(raw)
            if "artifacts" not in entry or self.runner.ready(name):
                continue
            try:
                self._load(name, entry)
            except (NotFound, FailedPrecondition) as e:
                _LOGGER.warning("model not restored", extra={"model": name, "error": str(e)})
                continue
            loaded.append(name)
            _LOGGER.info("model restored into Triton", extra={"model": name})
        return loaded

    def start(self, seconds: float) -> threading.Event:
        """Run `restore` now and then every `seconds` in a daemon thread, until the returned event is set."""
        stop = threading.Event()

        def loop() -> None:
            while True:
                try:
                    self.restore()
                except KinemaError as e:  # Triton, Redis or the store down: the next round tries again
                    _LOGGER.warning("model restore round failed", extra={"error": str(e)})
                except Exception:
                    _LOGGER.exception("model restore round failed")
                if stop.wait(seconds):
                    return

        threading.Thread(target=loop, name="model-restore", daemon=True).start()
        return stop

    def _load(self, name: str, entry: dict) -> None:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        tenant, shas = entry["tenant"], entry["artifacts"]
        blobs = {kind: self.artifacts.get(shas[kind], tenant) for kind in ARTIFACT_KINDS}  # hash-checked
        config = text_format.Parse(blobs["config"].decode("utf-8"), model_config_pb2.ModelConfig())
        weights = entry.get("weights_file") or "1/mmdit.safetensors"  # entries before the field: students
        self.runner.load(name, json_format.MessageToJson(config, preserving_proto_field_name=True),
                         {f"file:{weights}": blobs["weights"], "file:1/model.py": entry["backend"].encode(),
                          "file:README.md": blobs["card"]})  # fmt: skip


class TrainingRunner(JobRunner):
    """The orchestrator's JobRunner for model jobs: records under `prefix`, claims, Triton to load into."""

    prefix: str
    registry_key: str  # the Redis hash of the models this kind of job loaded: name -> `loaded_entry`

    def __init__(self, settings: OrchestratorSettings) -> None:
        super().__init__(settings)
        self.jobs.close()
        self.jobs = JobStore(settings.redis_url, retention_seconds=settings.job_retention_seconds,
                             max_attempts=settings.job_max_attempts, prefix=self.prefix)  # fmt: skip
        self.claims = ModelClaims(self.jobs)
        self._triton = None

    def claimed(self, job: pb.Job) -> common_pb2.ModelInfo:
        raise NotImplementedError

    def run(self, task, tenant: str, job_id: str) -> str:
        try:
            return super().run(task, tenant, job_id)
        finally:  # a job that ended (not one waiting for its retry) gives its claim back
            try:
                job = self.jobs.get(tenant, job_id)
                if job.state in TERMINAL:
                    self.claims.release(self.claimed(job), tenant, job_id)
            except KinemaError:
                _LOGGER.warning("could not release the claim of %s", job_id, exc_info=True)

    def _runner(self) -> TritonRunner:
        from kinema.inference.runner import TritonRunner
        from kinema.rpc.tls import internal_credentials

        with self._lock:
            if self._triton is None:
                self._triton = TritonRunner(self.settings.service.triton_url, timeout=600.0,
                                            credentials=internal_credentials(self.settings.service))  # fmt: skip
            return self._triton

    def _progress(self, tenant: str, job_id: str, attempt: int, done: int, total: int, started: float,
                  claim: common_pb2.ModelInfo, ttl: int) -> None:  # fmt: skip
        try:
            self.jobs.progress(tenant, job_id, attempt, done, total, time.monotonic() - started)
            self.claims.refresh(claim, tenant, job_id, ttl)
        except Unavailable:  # a missed progress report is not worth the job
            _LOGGER.warning("could not record progress", exc_info=True)

    def _publish(self, export: Path, weights_file: str, model_py: bytes, tenant: str, job_id: str,
                 provenance: Callable[[common_pb2.ModelInfo], Provenance]) -> tuple[Any, list[pb.Output]]:  # fmt: skip
        """Load the exported folder into Triton, check it serves the trained weights, store weights, card and config
        (outputs 0, 1, 2) with `provenance(served model)` and record the model; returns (the served model, outputs)."""
        from kinema.inference.model_config import read_config
        from kinema.orchestration.outputs import artifact_ref, provenance_message

        s = self.settings
        with self._lock:
            if self._store is None:
                from kinema.storage.artifacts import store_from_uri

                self._store = store_from_uri(s.artifacts, s.s3_access_key or None, s.s3_secret_key or None)
        config = read_config(export)
        sha = config.parameters["weights_sha256"].string_value
        files = {
            "weights": (export / weights_file).read_bytes(),
            "card": (export / "README.md").read_bytes(),
            "config": (export / "config.pbtxt").read_bytes(),
        }
        # Load first: the stored model is then one Triton accepted, and its ModelInfo is the served one.
        runner = self._runner()
        runner.load(export.name, json_format.MessageToJson(config, preserving_proto_field_name=True),
                    {f"file:{weights_file}": files["weights"], "file:1/model.py": model_py,
                     "file:README.md": files["card"]})  # fmt: skip
        served = runner.describe(export.name)
        with self.jobs._errors():
            self.jobs.redis.hset(self.registry_key, export.name, loaded_entry(tenant, job_id))
        if served.sha256 != sha:
            raise FailedPrecondition(f"Triton serves {export.name!r} with weights {served.sha256[:12]}, not the "
                                     f"trained {sha[:12]}", reason="MODEL_LOAD_MISMATCH")  # fmt: skip
        prov = provenance(common_pb2.ModelInfo(name=served.name, version=served.version, sha256=served.sha256,
                                               params_json=served.params_json))  # fmt: skip
        outputs = []
        for index, kind in enumerate(ARTIFACT_KINDS):
            artifact = self._store.put(files[kind], MEDIA_TYPES[kind], prov, tenant)
            output = pb.Output(index=index, artifact=artifact_ref(artifact), seed=prov.seed)
            if artifact.provenance is not None:
                output.provenance.CopyFrom(provenance_message(artifact.provenance))
            outputs.append(output)
        stored = {kind: o.artifact.sha256 for kind, o in zip(ARTIFACT_KINDS, outputs, strict=True)}
        entry = loaded_entry(tenant, job_id, stored, model_py.decode("utf-8"), weights_file)
        with self.jobs._errors():  # what a restore loads again, should Triton drop the model
            self.jobs.redis.hset(self.registry_key, export.name, entry)
        _LOGGER.info("model stored and loaded", extra={"model": served.name, "sha256": sha})
        return served, outputs


def card_json(weights: Path) -> dict:
    """The card dict exported weights carry in their safetensors metadata."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return json.loads(f.metadata()["card"])


__all__ = [
    "ARTIFACT_KINDS",
    "MEDIA_TYPES",
    "QUEUES",
    "ModelClaims",
    "ModelJobSettings",
    "ModelJobs",
    "ModelRestorer",
    "TrainingRunner",
    "as_dict",
    "card_json",
    "fill_job_message",
    "job_queues",
    "loaded_entry",
    "model_jobs_app",
    "read_record",
    "record_request",
]
