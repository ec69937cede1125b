"""The orchestrator's settings: the shared service settings plus its own, from `KINEMA_*` variables.

The job worker (`services.orchestrator.worker`) reads the same settings: it needs the model services, the artifact
store and Redis just as the server does.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kinema.rpc.settings import ServiceSettings
from kinema.storage.artifacts import ENV_ACCESS_KEY, ENV_SECRET_KEY, MAX_EXPIRY
from kinema.storage.media import DEFAULT_MAX_FRAMES, DEFAULT_MAX_SECONDS, DEFAULT_MAX_SIDE, MediaLimits

# Orchestrator field -> environment variable (the S3 credentials are read by name, see `from_env`).
ENV_VARS: dict[str, str] = {
    "text_encoder_url": "KINEMA_TEXT_ENCODER_URL",
    "denoiser_url": "KINEMA_DENOISER_URL",
    "autoencoder_url": "KINEMA_AUTOENCODER_URL",
    "distill_url": "KINEMA_DISTILL_URL",
    "depth_url": "KINEMA_DEPTH_URL",
    "artifacts": "KINEMA_ARTIFACTS",
    "url_ttl_seconds": "KINEMA_URL_TTL_SECONDS",
    "list_models_timeout_seconds": "KINEMA_LIST_MODELS_TIMEOUT_SECONDS",
    "redis_url": "KINEMA_REDIS_URL",
    "broker_url": "KINEMA_BROKER_URL",
    "job_max_retries": "KINEMA_JOB_MAX_RETRIES",
    "job_retry_backoff_seconds": "KINEMA_JOB_RETRY_BACKOFF_SECONDS",
    "job_max_attempts": "KINEMA_JOB_MAX_ATTEMPTS",
    "job_timeout_seconds": "KINEMA_JOB_TIMEOUT_SECONDS",
    "job_retention_seconds": "KINEMA_JOB_RETENTION_SECONDS",
    "job_visibility_timeout_seconds": "KINEMA_JOB_VISIBILITY_TIMEOUT_SECONDS",
    "upload_max_bytes": "KINEMA_UPLOAD_MAX_BYTES",
    "upload_max_image_side": "KINEMA_UPLOAD_MAX_IMAGE_SIDE",
    "job_record_retry_seconds": "KINEMA_JOB_RECORD_RETRY_SECONDS",
    "max_queued_jobs": "KINEMA_MAX_QUEUED_JOBS",
    "video_max_frames": "KINEMA_VIDEO_MAX_FRAMES",
    "video_max_seconds": "KINEMA_VIDEO_MAX_SECONDS",
    "distill_dir": "KINEMA_DISTILL_DIR",
}


def _finite_positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and 0 < x < float("inf")


def _int_in(lo: int, hi: int) -> Callable[[object], bool]:
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# field -> (parse from text, check, what it must be); strings not listed here only need to be non-empty.
_CHECKS: dict[str, tuple[Callable[[str], Any], Callable[[object], bool], str]] = {
    "url_ttl_seconds": (int, _int_in(1, int(MAX_EXPIRY.total_seconds())), "an integer number of seconds in 1..604800"),
    "list_models_timeout_seconds": (float, _finite_positive, "a finite number > 0"),
    "redis_url": (str, lambda x: x == "" or str(x).startswith(_REDIS_SCHEMES), "a redis://host:port/db URL"),
    "broker_url": (str, lambda x: x == "" or str(x).startswith(_REDIS_SCHEMES), "a redis://host:port/db URL"),
    "job_max_retries": (int, _int_in(0, 100), "an integer in 0..100"),
    "job_retry_backoff_seconds": (float, _finite_positive, "a finite number of seconds > 0"),
    "job_max_attempts": (int, _int_in(1, 1000), "an integer in 1..1000"),
    "job_timeout_seconds": (float, _finite_positive, "a finite number of seconds > 0"),
    "job_retention_seconds": (int, _int_in(60, 10 * 365 * 86400), "an integer number of seconds >= 60"),
    "job_visibility_timeout_seconds": (float, _finite_positive, "a finite number of seconds > 0"),
    "upload_max_bytes": (int, _int_in(1, 1 << 40), "an integer number of bytes in 1..2**40"),
    "upload_max_image_side": (int, _int_in(1, 65535), "an integer number of pixels in 1..65535"),
    "job_record_retry_seconds": (float, _finite_positive, "a finite number of seconds > 0"),
    "max_queued_jobs": (int, _int_in(0, 1 << 30), "an integer >= 0 (0: no limit)"),
    "video_max_frames": (int, _int_in(1, 1 << 20), "an integer number of frames in 1..1048576"),
    "video_max_seconds": (float, _finite_positive, "a finite number of seconds > 0"),
}


@dataclass(frozen=True)
class OrchestratorSettings:
    """Where the model services, the artifact store and Redis are, composed with the settings every service shares."""

    service: ServiceSettings
    text_encoder_url: str  # host:port of each model service
    denoiser_url: str
    autoencoder_url: str
    artifacts: str  # file:///path or s3://bucket?endpoint=host:port (kinema.storage.artifacts.store_from_uri)
    # host:port of the distill service (optional): a run whose denoiser is a student it lists samples there.
    distill_url: str = ""
    # host:port of the depth service (optional): the video pipeline (edit_video) needs it; without it, it is refused.
    depth_url: str = ""
    url_ttl_seconds: int = 3600  # lifetime of the presigned URLs in Generate results and job outputs
    list_models_timeout_seconds: float = 5.0  # ListModels waits this long for each service
    s3_access_key: str = field(default="", repr=False)
    s3_secret_key: str = field(default="", repr=False)
    # Jobs (docs/jobs.md). Without a Redis URL the job RPCs answer UNIMPLEMENTED and Generate still works.
    redis_url: str = field(default="", repr=False)  # job records, Celery results, cancel flags; may hold a password
    broker_url: str = field(default="", repr=False)  # the Celery broker; "" = redis_url
    job_max_retries: int = 5  # retries of a job that failed with UNAVAILABLE (a model service or the store down)
    # 5 retries at 4 s: 60-120 s of waits in all, longer than a Triton restart that reloads every model (26-52 s here)
    job_retry_backoff_seconds: float = 4.0  # the n-th retry waits 0.5-1 x min(60, this * 2^n) s
    job_max_attempts: int = 8  # starts of one job in all (retries and redeliveries after a lost worker)
    job_timeout_seconds: float = 3600.0  # deadline of each model service call a job makes
    job_retention_seconds: int = 7 * 86400  # a finished job is kept this long, then answers NOT_FOUND
    # A job unacknowledged this long is handed to another worker: longer than any job runs (celery_app docstring).
    job_visibility_timeout_seconds: float = 6 * 3600.0
    # Uploads (UploadArtifact): the largest upload in bytes, and the largest side in pixels of an input image (or
    # video frame), checked from the file's header before any pixel is decoded (decompression bombs).
    upload_max_bytes: int = 256 << 20
    upload_max_image_side: int = DEFAULT_MAX_SIDE
    # A worker that cannot write a job's end (COMPLETED, FAILED, CANCELLED) to Redis tries again this long.
    job_record_retry_seconds: float = 300.0
    # SubmitJob is refused (RESOURCE_EXHAUSTED, reason JOB_QUEUE_FULL, with a retry hint) while this many jobs wait in
    # the Celery queue for a worker; 0: no limit. Concurrent submits may pass it by a few (the check is a read).
    max_queued_jobs: int = 1000
    # The longest input video a run reads (and an upload may be), checked from its header and again while decoding,
    # before any sampling; frames larger than upload_max_image_side per side are refused too.
    video_max_frames: int = DEFAULT_MAX_FRAMES
    video_max_seconds: float = DEFAULT_MAX_SECONDS
    # Distillation jobs (kinema.orchestration.distillation): the worker's folder for teacher latents (kept and reused
    # per teacher) and each job's checkpoints (a retried job resumes from them); "": <system temp>/kinema-distill.
    distill_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("text_encoder_url", "denoiser_url", "autoencoder_url", "artifacts"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{ENV_VARS[name]} must be set (a non-empty {'URI' if name == 'artifacts' else 'host:port'})"
                )
        for name, (_, check, must) in _CHECKS.items():
            value = getattr(self, name)
            if not check(value):
                shown = value if "url" not in name else "(hidden)"  # a Redis URL may carry a password
                raise ValueError(f"{ENV_VARS[name]}={shown!r}: must be {must}")
        if self.broker_url and not self.redis_url:
            raise ValueError(f"{ENV_VARS['broker_url']} needs {ENV_VARS['redis_url']} (job records live there)")
        if self.job_max_attempts <= self.job_max_retries:
            raise ValueError(
                f"{ENV_VARS['job_max_attempts']}={self.job_max_attempts} must be > "
                f"{ENV_VARS['job_max_retries']}={self.job_max_retries} (every retry is an attempt)"
            )

    @property
    def addresses(self) -> dict[str, str]:
        """Capability -> host:port of the service serving it; "distill" and "depth" only where they are set."""
        addresses = {"text_encoder": self.text_encoder_url, "denoiser": self.denoiser_url,
                     "autoencoder": self.autoencoder_url}  # fmt: skip
        if self.distill_url:
            addresses["distill"] = self.distill_url
        if self.depth_url:
            addresses["depth"] = self.depth_url
        return addresses

    @property
    def media_limits(self) -> MediaLimits:
        """The limits every input image and video is checked against, at upload and when a run reads it."""
        return MediaLimits(max_side=self.upload_max_image_side, max_frames=self.video_max_frames,
                           max_seconds=self.video_max_seconds)  # fmt: skip

    @property
    def distill_path(self) -> Path:
        return Path(self.distill_dir) if self.distill_dir else Path(tempfile.gettempdir()) / "kinema-distill"

    @property
    def jobs_enabled(self) -> bool:
        return bool(self.redis_url)

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @classmethod
    def from_env(
        cls, service: ServiceSettings | None = None, environ: Mapping[str, str] = os.environ
    ) -> OrchestratorSettings:
        """`service` (default: ServiceSettings.from_env) plus the orchestrator's `KINEMA_*` variables."""
        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            raw = (environ.get(var) or "").strip()
            if not raw:
                continue
            parse, _, must = _CHECKS.get(name, (str, None, ""))
            try:
                values[name] = parse(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r}: must be {must}") from None
        for name in ("text_encoder_url", "denoiser_url", "autoencoder_url", "artifacts"):
            values.setdefault(name, "")
        return cls(
            service=service if service is not None else ServiceSettings.from_env(environ),
            s3_access_key=environ.get(ENV_ACCESS_KEY, ""),
            s3_secret_key=environ.get(ENV_SECRET_KEY, ""),
            **values,
        )
