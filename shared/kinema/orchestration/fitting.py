"""IIN fitting as a job: Fit's checks, its record, the claim on the new model's name, and the Celery task that trains an
interpretation model (`kinema.train.iin.train`), scores it (`kinema.eval.iin.evaluate`), stores it and loads it into
Triton, where the interpret service serves it like the shipped ones.

It is a model job (`kinema.orchestration.model_jobs`), as a distillation is: a fitting's record is a
`kinema.orchestrator.v1.Job` under `RECORD_PREFIX` whose `request` is a `PipelineRequest` with pipeline
"interpret_fit", the resolved `FitRequest` in `options` and the representation's encoder as Triton served it in
`models`; `fitting_message` turns a record into the `kinema.interpret.v1.Fitting` clients see. Its claim is the new
model's name, so two fittings never load the same name.

The task runs in the orchestrator's job worker on the Celery queue `fit`. It renders the factor data and encodes it
with the representation's encoder from the worker's model repository (`KINEMA_MODELS`; its pinned weights must be
the ones Triton serves), and keeps the encoded data (per representation weights and count, reused by the next fitting)
and each job's checkpoints (a retried job resumes from them) under `KINEMA_DISTILL_DIR`/iin-data and /fit.
"""

from __future__ import annotations

import json
import math
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
from kinema.errors import AlreadyExists, FailedPrecondition, InvalidInput, KinemaError
from kinema.interpret.v1 import interpret_pb2 as ipb
from kinema.orchestration import model_jobs
from kinema.orchestration.model_jobs import ModelJobs, ModelJobSettings, TrainingRunner, as_dict
from kinema.orchestration.worker import JobCancelled, JobTask
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.storage.artifacts import Provenance

if TYPE_CHECKING:
    from celery import Celery

    from kinema.jobs.celery_app import KinemaTask
    from kinema.orchestration.settings import OrchestratorSettings

FIT_TASK = "kinema.interpret.run_fitting"
FIT_QUEUE = "fit"
PIPELINE = "interpret_fit"  # Job.request.pipeline of a fitting's record
RECORD_PREFIX = "kinema-fit"  # JobStore prefix of the records and the name claims
# The models fittings loaded (name -> JSON `model_jobs.loaded_entry`): the interpret service lists them and loads them
# back into a Triton that dropped them.
MODELS_KEY = f"{RECORD_PREFIX}:models"
RESTORE_ENV = "KINEMA_MODEL_RESTORE_SECONDS"
WEIGHTS_FILE = "1/iin.safetensors"
PROGRESS_EVERY = 1.0  # s between two progress writes (the last step is always written)
CLAIM_MARGIN_SECONDS = 6 * 3600  # a name claim outlives its job's budget by this much unless refreshed
EDIT_SAMPLES = 200  # decoded edits / samples per metric, at most
_NAME = re.compile(r"iin_[a-z0-9_]{1,48}")
KINDS = ("factor", "mle", "invariance", "net2net")  # as kinema.train.iin.KINDS, the default first
REPRESENTATIONS = ("vector_ae", "vae")  # as kinema.train.iin.REPRESENTATIONS, the default first
CODE_SIZES = {"vector_ae": 64, "vae": 4 * 16 * 16}  # the size of each representation's code
DEFAULT_COMPONENTS = {"vector_ae": 64, "vae": 128}
FACTOR_COUNT = 4  # colour, shape, position, size (kinema.train.iin.FACTORS)
MAX_SEED = 2**31 - 1
# The shipped iin_factor's: 0.9 (the trainer's default) leaves a shared block 19% of its variance to differ in, and a
# position edit then carries some appearance along (bench/results/iin.md).
DEFAULT_RHO = 0.98

# field -> (lowest, highest, default for 0)
LIMITS: dict[str, tuple[float, float, float]] = {
    "samples": (64, 24_000, 8000),
    "train_steps": (1, 100_000, 2000),
    "max_seconds": (0, 6 * 3600, 1800),  # lowest excluded
    "batch": (2, 1024, 256),
    "eval_samples": (16, 2000, 500),
}


def _out_of_range(field: str, message: str, low: float | None = None, high: float | None = None) -> InvalidInput:
    metadata = {} if low is None else {"min": f"{low:g}", "max": f"{high:g}"}
    return InvalidInput(f"{field} {message}", reason="OUT_OF_RANGE", field=field, metadata=metadata)


@dataclass(frozen=True)
class FitSpec:
    """A FitRequest with its defaults resolved and its values checked."""

    kind: str
    representation: str
    samples: int
    train_steps: int
    max_seconds: float
    batch: int
    components: int
    factor_dims: tuple[int, ...]
    noise: float
    rho: float
    seed: int
    name: str  # "" until the id is known: `model_name`
    eval_samples: int

    @classmethod
    def from_request(cls, request: ipb.FitRequest) -> FitSpec:
        """InvalidInput naming the first field that is unknown, malformed or out of its range."""
        kind, representation = request.kind or KINDS[0], request.representation or REPRESENTATIONS[0]
        if kind not in KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, got {kind!r:.80}", reason="UNKNOWN_KIND",
                               field="kind")  # fmt: skip
        if representation not in REPRESENTATIONS:
            raise InvalidInput(f"representation must be one of {', '.join(REPRESENTATIONS)}, got "
                               f"{representation!r:.80}", reason="UNKNOWN_REPRESENTATION",
                               field="representation")  # fmt: skip
        values: dict[str, Any] = {}
        given = {"samples": request.data.samples} | {k: getattr(request, k) for k in LIMITS if k != "samples"}
        for name, (low, high, default) in LIMITS.items():
            value = given[name] or default
            ok = (low < value <= high) if name == "max_seconds" else (low <= value <= high)
            if not ok or value != value:
                bound = f"in ({low:g}, {high:g}]" if name == "max_seconds" else f"in {low:g}..{high:g}"
                field = "data.samples" if name == "samples" else name
                raise _out_of_range(field, f"must be {bound} (0: {default:g}), got {value:g}", low, high)
            values[name] = value
        size = CODE_SIZES[representation]
        top = min(256, size, values["samples"])
        components = request.components or DEFAULT_COMPONENTS[representation]
        if not 4 <= components <= top:
            default = DEFAULT_COMPONENTS[representation]
            raise _out_of_range("components", f"must be in 4..{top} for {representation} with {values['samples']} "
                                f"renders (0: {default}), got {components}", 4, top)  # fmt: skip
        dims = tuple(request.factor_dims)
        if dims and kind != "factor":
            raise InvalidInput(f"factor_dims applies to kind factor only, not {kind}", reason="NOT_APPLICABLE",
                               field="factor_dims")  # fmt: skip
        if dims and (len(dims) != FACTOR_COUNT or min(dims) < 1 or sum(dims) >= components):
            raise _out_of_range("factor_dims", f"must be {FACTOR_COUNT} numbers >= 1 (colour, shape, position, size) "
                                f"summing to less than components ({components}), got {list(dims)}")  # fmt: skip
        noise = request.noise if request.HasField("noise") else 0.3
        if not 0.0 <= noise <= 2.0:  # NaN fails too
            raise _out_of_range("noise", f"must be in [0, 2] (unset: 0.3), got {noise:g}", 0, 2)
        if request.HasField("rho") and kind != "factor":
            raise InvalidInput(f"rho applies to kind factor only, not {kind}", reason="NOT_APPLICABLE", field="rho")
        rho = request.rho if request.HasField("rho") else DEFAULT_RHO
        if not 0.0 < rho < 1.0:
            raise _out_of_range("rho", f"must lie in (0, 1) (unset: {DEFAULT_RHO}), got {rho:g}", 0, 1)
        if request.seed > MAX_SEED:
            raise _out_of_range("seed", f"must be in 0..{MAX_SEED}, got {request.seed}", 0, MAX_SEED)
        if request.name and not _NAME.fullmatch(request.name):
            raise InvalidInput(f"name must be 'iin_' followed by 1-48 of a-z, 0-9, '_', got {request.name!r:.80}",
                               reason="INVALID_NAME", field="name")  # fmt: skip
        return cls(kind=kind, representation=representation, components=components, factor_dims=dims,
                   noise=round(float(noise), 6), rho=round(float(rho), 6), seed=request.seed, name=request.name,
                   **values)  # fmt: skip

    def to_request(self) -> ipb.FitRequest:
        return ipb.FitRequest(
            kind=self.kind, representation=self.representation, data=ipb.FactorData(samples=self.samples),
            train_steps=self.train_steps, max_seconds=self.max_seconds, batch=self.batch, components=self.components,
            factor_dims=self.factor_dims, noise=self.noise, rho=self.rho, seed=self.seed, name=self.name,
            eval_samples=self.eval_samples,
        )  # fmt: skip

    def model_name(self, job_id: str) -> str:
        return self.name or f"iin_fit_{job_id[:12]}"  # ids are lowercase hex

    def train_config(self):
        from kinema.train.iin import IINTrainConfig

        return IINTrainConfig(kind=self.kind, representation=self.representation, samples=self.samples,
                              components=self.components, batch=self.batch, steps=self.train_steps, rho=self.rho,
                              factor_dims=self.factor_dims, noise=self.noise, seed=self.seed,
                              checkpoint_every=max(1, min(500, self.train_steps)))  # fmt: skip


def encoder_name(representation: str) -> str:
    """The Triton model that encodes images into `representation`'s code (kinema.inference.interpreter)."""
    return f"{representation}_encoder"


# -- records ----------------------------------------------------------------------------------------


def record_request(spec: FitSpec, encoder: common_pb2.ModelInfo) -> pb.PipelineRequest:
    """The PipelineRequest a fitting's Job record carries: the resolved request and the encoder served."""
    return model_jobs.record_request(PIPELINE, spec.to_request(), "representation", encoder)


def read_record(job: pb.Job) -> tuple[FitSpec, common_pb2.ModelInfo]:
    request, encoder = model_jobs.read_record(job, ipb.FitRequest, "representation")
    return FitSpec.from_request(request), encoder


def fitting_message(job: pb.Job) -> ipb.Fitting:
    """The client's view of a fitting record; outputs become the model, its metrics and artifacts."""
    spec, encoder = read_record(job)
    request = spec.to_request()
    request.name = spec.model_name(job.id)
    message = ipb.Fitting(id=job.id, state=job.state, request=request, representation=encoder,
                          attempts=job.attempts, cancel_requested=job.cancel_requested)  # fmt: skip
    return model_jobs.fill_job_message(message, job, ipb.FittingError, "model")


def claim_ttl(spec: FitSpec) -> int:
    return int(spec.max_seconds) + CLAIM_MARGIN_SECONDS


def name_claim(spec: FitSpec, job_id: str) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name=spec.model_name(job_id))


def job_settings(environ: Mapping[str, str] = os.environ) -> ModelJobSettings:
    """The interpret service's job settings; fitted models are loaded back every KINEMA_MODEL_RESTORE_SECONDS."""
    return ModelJobSettings.from_env(RESTORE_ENV, environ)


class FitJobs(ModelJobs):
    """The interpret service's side of fittings: records, name claims and the Celery app that sends them."""

    prefix, task, queue = RECORD_PREFIX, FIT_TASK, FIT_QUEUE

    def claimed(self, job: pb.Job) -> common_pb2.ModelInfo:
        return name_claim(read_record(job)[0], job.id)

    def start(self, tenant: str, spec: FitSpec, encoder: common_pb2.ModelInfo) -> pb.Job:
        """Record, claim the name and queue; AlreadyExists (the running id in metadata) while it is claimed."""

        def busy(holder: str) -> AlreadyExists:
            return AlreadyExists(f"fitting {holder} will load a model named {spec.name!r}; choose another name, or "
                                 "watch it with GetFitting", reason="FITTING_RUNNING", field="name",
                                 metadata={"fitting_id": holder})  # fmt: skip

        return self._start(tenant, record_request(spec, encoder), claim_ttl(spec), busy)

    def models(self) -> list[str]:
        """Names of the models fittings loaded into Triton (it may have dropped some since: a restart)."""
        return self.loaded(MODELS_KEY)


# -- the task -------------------------------------------------------------------------------------------


class FittingRunner(TrainingRunner):
    """The orchestrator's JobRunner for fitting records: `_make` trains, scores, stores and loads an IIN."""

    prefix, registry_key = RECORD_PREFIX, MODELS_KEY

    def claimed(self, job: pb.Job) -> common_pb2.ModelInfo:
        return name_claim(read_record(job)[0], job.id)

    def _make(self, task: KinemaTask, job: pb.Job, attempt: int, started: float) -> list[pb.Output]:
        tenant, job_id = job.tenant, job.id
        spec, encoder = read_record(job)
        name = spec.model_name(job_id)
        work = self.settings.distill_path / "fit" / job_id
        export = work / "export" / name
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if self._cancelled(task):
                raise JobCancelled
            if done < total and time.monotonic() - last[0] < PROGRESS_EVERY:
                return
            last[0] = time.monotonic()
            self._progress(tenant, job_id, attempt, done, total, started, name_claim(spec, job_id), claim_ttl(spec))

        if self._cancelled(task):
            raise JobCancelled
        if not (export / "config.pbtxt").is_file():  # else a retry after the training finished: store and load again
            self._check_encoder(self.settings.service.models_dir, encoder)
            self._fit(spec, work, export, job_id, progress)
        if self._cancelled(task):
            raise JobCancelled  # nothing stored, nothing loaded after a cancel
        card = json.loads((export / "card.json").read_text(encoding="utf-8"))

        def provenance(served: common_pb2.ModelInfo) -> Provenance:
            metrics = {k: card[k] for k in ("steps_done", "train_seconds", "final_train_loss", "metrics",
                                            "dimension_estimate") if k in card}  # fmt: skip
            parameters = {
                "request": as_dict(spec.to_request()) | {"name": name},
                "metrics": metrics,
                "model": as_dict(served),
                "models": {"representation": {"name": encoder.name, "version": encoder.version},
                           "model": {"name": served.name, "version": served.version}},
                "fitting_id": job_id,
            }  # fmt: skip
            return Provenance(pipeline=PIPELINE, parameters=parameters, seed=spec.seed,
                              models={"model": served.sha256}
                              | ({"representation": encoder.sha256} if encoder.sha256 else {}))  # fmt: skip

        model_py = (export / "1" / "model.py").read_bytes()
        return self._publish(export, WEIGHTS_FILE, model_py, tenant, job_id, provenance)[1]

    def _fit(self, spec: FitSpec, work: Path, export: Path, job_id: str, progress) -> None:
        """Train (resuming a checkpoint of an earlier attempt), score on held-out renders and export the model folder:
        weights, card, model.py, config.pbtxt last (the marker of a finished export)."""
        from kinema.eval.iin import evaluate
        from kinema.train import iin

        cfg = spec.train_config()
        models, cache = self.settings.service.models_dir, self.settings.distill_path / "iin-data"
        model, edges, estimate, data = iin.train(cfg, work / "run", models, max_seconds=spec.max_seconds, cache=cache,
                                                 on_step=progress)  # fmt: skip
        iin.set_prototypes(model, data, edges)
        test = iin.factor_data("test", spec.eval_samples, models, cache, spec.representation)
        metrics = evaluate(model, spec.kind, data, test, edges, models, min(EDIT_SAMPLES, spec.eval_samples),
                           seed=spec.seed, representation=spec.representation, cache=cache)  # fmt: skip
        if not math.isfinite(metrics["likelihood"]["test_nll_nats_per_dim"]):
            raise FailedPrecondition("the fitted flow's test likelihood is not finite; lower the noise or train "
                                     "longer", reason="FIT_DIVERGED")  # fmt: skip
        card = iin.run_card(cfg, work / "run", model, edges, estimate, metrics, spec.eval_samples, "float32")
        card |= {"fitting_id": job_id, "data": card["data"] + f" (edits and samples on the first "
                 f"{min(EDIT_SAMPLES, spec.eval_samples)})"}  # fmt: skip
        request = json_format.MessageToJson(spec.to_request(), preserving_proto_field_name=True, indent=None)
        command = "kinema.interpret.v1.Interpret/Fit " + shlex.quote(request)
        export.mkdir(parents=True, exist_ok=True)
        (export / "card.json").write_text(json.dumps(card), encoding="utf-8")
        iin.export(model, cfg, export, card, command)

    @staticmethod
    def _check_encoder(models: Path, encoder: common_pb2.ModelInfo) -> None:
        """The worker encodes the data with its repository's encoder: it must hold the weights Triton serves."""
        from kinema.repository import model_parameters

        try:
            pinned = model_parameters(models, encoder.name).get("weights_sha256", "")
        except (KinemaError, OSError, ValueError) as e:
            raise FailedPrecondition(f"the worker's model repository {models} has no {encoder.name!r}: {e}",
                                     reason="REPRESENTATION_NOT_IN_REPOSITORY") from None  # fmt: skip
        if encoder.sha256 and pinned and pinned != encoder.sha256:
            raise FailedPrecondition(
                f"the worker's model repository holds other weights of {encoder.name!r} ({pinned[:12]}) than Triton "
                f"serves ({encoder.sha256[:12]}); point KINEMA_MODELS at the repository Triton serves",
                reason="REPRESENTATION_MISMATCH",
            )


def register_fitting(app: Celery, settings: OrchestratorSettings) -> None:
    """Register the fitting task on the job app (`make_job_app` calls this)."""
    runner = FittingRunner(settings)

    @app.task(bind=True, base=JobTask, name=FIT_TASK, runner=runner, max_retries=settings.job_max_retries,
              autoretry_for=())  # fmt: skip
    def run_fitting(self: JobTask, tenant: str, job_id: str) -> str:
        return self.runner.run(self, tenant, job_id)


__all__ = [
    "FIT_QUEUE",
    "FIT_TASK",
    "MODELS_KEY",
    "FitJobs",
    "FitSpec",
    "FittingRunner",
    "encoder_name",
    "fitting_message",
    "job_settings",
    "record_request",
    "register_fitting",
]
