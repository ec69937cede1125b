"""The orchestrator's settings from `KINEMA_*` variables, and the pipeline registry, in process."""

from __future__ import annotations

import pytest

from kinema.errors import InvalidInput, NotFound
from kinema.orchestration.pipelines import REGISTRY, Registry, TextToImagePipeline
from kinema.orchestration.settings import OrchestratorSettings
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.rpc.settings import ServiceSettings
from kinema.storage.video import VideoLimits

ENV = {
    "KINEMA_TEXT_ENCODER_URL": "te:50051",
    "KINEMA_DENOISER_URL": "dn:50051",
    "KINEMA_AUTOENCODER_URL": "ae:50051",
    "KINEMA_ARTIFACTS": "s3://artifacts?endpoint=minio:9000",
    "KINEMA_S3_ACCESS_KEY": "key",
    "KINEMA_S3_SECRET_KEY": "secret",
    "KINEMA_PORT": "6000",
}


def test_settings_from_env() -> None:
    s = OrchestratorSettings.from_env(environ=ENV | {"KINEMA_URL_TTL_SECONDS": "60"})
    assert s.addresses == {"text_encoder": "te:50051", "denoiser": "dn:50051", "autoencoder": "ae:50051"}
    assert (s.artifacts, s.url_ttl_seconds, s.service.port) == ("s3://artifacts?endpoint=minio:9000", 60, 6000)
    assert (s.s3_access_key, s.s3_secret_key) == ("key", "secret") and "secret" not in repr(s)
    assert OrchestratorSettings.from_env(ServiceSettings(port=7), ENV).service.port == 7
    assert OrchestratorSettings.from_env(environ=ENV).url_ttl_seconds == 3600


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"KINEMA_DENOISER_URL": ""}, "KINEMA_DENOISER_URL"),
        ({"KINEMA_ARTIFACTS": " "}, "KINEMA_ARTIFACTS"),
        ({"KINEMA_URL_TTL_SECONDS": "0"}, "KINEMA_URL_TTL_SECONDS"),
        ({"KINEMA_URL_TTL_SECONDS": "1h"}, "KINEMA_URL_TTL_SECONDS"),
        ({"KINEMA_URL_TTL_SECONDS": "604801"}, "KINEMA_URL_TTL_SECONDS"),
        ({"KINEMA_LIST_MODELS_TIMEOUT_SECONDS": "-1"}, "KINEMA_LIST_MODELS_TIMEOUT_SECONDS"),
    ],
)
def test_bad_settings_name_the_variable(change, names) -> None:
    with pytest.raises(ValueError, match=names):
        OrchestratorSettings.from_env(environ=ENV | change)


def test_job_settings_from_env() -> None:
    s = OrchestratorSettings.from_env(environ=ENV)
    assert not s.jobs_enabled and s.redis_url == "" and (s.job_max_retries, s.job_max_attempts) == (5, 8)
    jobs = {
        "KINEMA_REDIS_URL": "redis://:hunter2@redis:6379/0",
        "KINEMA_JOB_MAX_RETRIES": "1",
        "KINEMA_JOB_RETRY_BACKOFF_SECONDS": "0.5",
        "KINEMA_JOB_MAX_ATTEMPTS": "2",
        "KINEMA_JOB_TIMEOUT_SECONDS": "60",
        "KINEMA_JOB_RETENTION_SECONDS": "3600",
        "KINEMA_JOB_VISIBILITY_TIMEOUT_SECONDS": "7200",
    }
    s = OrchestratorSettings.from_env(environ=ENV | jobs)
    assert s.jobs_enabled and s.celery_broker_url == s.redis_url == "redis://:hunter2@redis:6379/0"
    assert (s.job_max_retries, s.job_retry_backoff_seconds, s.job_max_attempts) == (1, 0.5, 2)
    assert (s.job_timeout_seconds, s.job_retention_seconds, s.job_visibility_timeout_seconds) == (60, 3600, 7200)
    assert "hunter2" not in repr(s)
    broker = OrchestratorSettings.from_env(environ=ENV | jobs | {"KINEMA_BROKER_URL": "redis://broker:6379/1"})
    assert broker.celery_broker_url == "redis://broker:6379/1" and broker.redis_url == jobs["KINEMA_REDIS_URL"]


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"KINEMA_REDIS_URL": "http://redis:6379"}, "KINEMA_REDIS_URL"),
        ({"KINEMA_BROKER_URL": "redis://broker:6379/0"}, "KINEMA_BROKER_URL needs KINEMA_REDIS_URL"),
        ({"KINEMA_JOB_MAX_RETRIES": "-1"}, "KINEMA_JOB_MAX_RETRIES"),
        ({"KINEMA_JOB_MAX_RETRIES": "three"}, "KINEMA_JOB_MAX_RETRIES"),
        ({"KINEMA_JOB_MAX_ATTEMPTS": "5"}, "KINEMA_JOB_MAX_ATTEMPTS=5 must be > KINEMA_JOB_MAX_RETRIES=5"),
        ({"KINEMA_JOB_RETRY_BACKOFF_SECONDS": "0"}, "KINEMA_JOB_RETRY_BACKOFF_SECONDS"),
        ({"KINEMA_JOB_TIMEOUT_SECONDS": "inf"}, "KINEMA_JOB_TIMEOUT_SECONDS"),
        ({"KINEMA_JOB_RETENTION_SECONDS": "10"}, "KINEMA_JOB_RETENTION_SECONDS"),
        ({"KINEMA_JOB_VISIBILITY_TIMEOUT_SECONDS": "-5"}, "KINEMA_JOB_VISIBILITY_TIMEOUT_SECONDS"),
        ({"KINEMA_MAX_QUEUED_JOBS": "-1"}, "KINEMA_MAX_QUEUED_JOBS"),
        ({"KINEMA_MAX_QUEUED_JOBS": "lots"}, "KINEMA_MAX_QUEUED_JOBS"),
    ],
)
def test_bad_job_settings_name_the_variable(change, names) -> None:
    with pytest.raises(ValueError, match=names) as info:
        OrchestratorSettings.from_env(environ=ENV | change)
    assert "hunter2" not in str(info.value)


def test_a_bad_redis_url_is_not_echoed() -> None:
    with pytest.raises(ValueError, match="KINEMA_REDIS_URL") as info:
        OrchestratorSettings.from_env(environ=ENV | {"KINEMA_REDIS_URL": "http://:hunter2@redis"})
    assert "hunter2" not in str(info.value)


def test_registry() -> None:
    registry = Registry()
    registry.register(TextToImagePipeline())
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TextToImagePipeline())
    with pytest.raises(NotFound, match="registered: text_to_image") as info:
        registry.get("inpaint")
    assert (info.value.reason, info.value.field) == ("PIPELINE_NOT_FOUND", "pipeline")
    assert [i.name for i in REGISTRY.infos()] == ["edit_video", "image_to_image", "inpaint", "text_to_image"]
    assert REGISTRY.infos("nope") == []


def test_text_to_image_fills_in_defaults() -> None:
    prepared = TextToImagePipeline().prepare(pb.PipelineRequest(pipeline="text_to_image", prompts=["a", "b"]), 16)
    assert (prepared.steps, prepared.guidance, prepared.size, prepared.sampler, prepared.shift) == (
        28,
        4.0,
        64,
        "euler",
        1.0,
    )
    assert 0 <= prepared.seed < 2**63 - 16
    zero = pb.PipelineRequest(pipeline="text_to_image", prompts=[""], seed=0, guidance=0.0)
    prepared = TextToImagePipeline().prepare(zero, 16)
    assert (prepared.seed, prepared.guidance, prepared.prompts) == (0, 0.0, [""])  # zeros that mean zero
    with pytest.raises(InvalidInput) as info:
        TextToImagePipeline().prepare(pb.PipelineRequest(pipeline="text_to_image", prompts=["a"], steps=2000), 16)
    assert info.value.field == "steps"


def test_max_queued_jobs_defaults_to_a_bound_and_zero_turns_it_off() -> None:
    assert OrchestratorSettings.from_env(environ=ENV).max_queued_jobs == 1000
    assert OrchestratorSettings.from_env(environ=ENV | {"KINEMA_MAX_QUEUED_JOBS": "0"}).max_queued_jobs == 0


def test_the_distill_service_is_optional() -> None:
    assert "distill" not in OrchestratorSettings.from_env(environ=ENV).addresses
    s = OrchestratorSettings.from_env(environ=ENV | {"KINEMA_DISTILL_URL": " ds:50051 "})
    assert s.addresses["distill"] == "ds:50051" and s.distill_url == "ds:50051"


def test_the_depth_service_is_optional_and_video_limits_come_from_the_env() -> None:
    s = OrchestratorSettings.from_env(environ=ENV)
    assert "depth" not in s.addresses and (s.media_limits.max_frames, s.media_limits.max_seconds) == (512, 60.0)
    s = OrchestratorSettings.from_env(environ=ENV | {"KINEMA_DEPTH_URL": "dp:50051", "KINEMA_VIDEO_MAX_FRAMES": "24",
                                                    "KINEMA_VIDEO_MAX_SECONDS": "2.5",
                                                    "KINEMA_UPLOAD_MAX_IMAGE_SIDE": "640"})  # fmt: skip
    assert s.addresses["depth"] == "dp:50051"
    assert s.media_limits.video == VideoLimits(max_frames=24, max_seconds=2.5, max_side=640)
    for var, value in (("KINEMA_VIDEO_MAX_FRAMES", "0"), ("KINEMA_VIDEO_MAX_FRAMES", "1.5"),
                       ("KINEMA_VIDEO_MAX_SECONDS", "inf"), ("KINEMA_VIDEO_MAX_SECONDS", "-1")):  # fmt: skip
        with pytest.raises(ValueError, match=var):
            OrchestratorSettings.from_env(environ=ENV | {var: value})


def test_text_to_image_remembers_which_sampling_fields_were_left_to_the_denoiser() -> None:
    """Unset steps and guidance get the teacher's defaults now and the bound denoiser's at run time (a student's)."""
    unset = TextToImagePipeline().prepare(pb.PipelineRequest(pipeline="text_to_image", prompts=["a"]), 16)
    assert unset.defaulted == {"steps", "guidance"} and (unset.steps, unset.guidance) == (28, 4.0)
    given = pb.PipelineRequest(pipeline="text_to_image", prompts=["a"], steps=4, guidance=1.0)
    assert TextToImagePipeline().prepare(given, 16).defaulted == frozenset()


def test_the_distill_service_reads_the_store_and_its_restore_interval_and_refuses_a_bad_interval() -> None:
    from kinema.orchestration.distillation import job_settings

    env = {"KINEMA_REDIS_URL": "redis://127.0.0.1:6379/0", "KINEMA_ARTIFACTS": "s3://b?endpoint=h:9000",
           "KINEMA_S3_ACCESS_KEY": "k", "KINEMA_S3_SECRET_KEY": "s"}  # fmt: skip
    s = job_settings(env)
    assert (s.artifacts, s.s3_access_key, s.s3_secret_key) == ("s3://b?endpoint=h:9000", "k", "s")
    assert s.restore_seconds == 30
    assert job_settings(env | {"KINEMA_STUDENT_RESTORE_SECONDS": "0"}).restore_seconds == 0
    for bad in ("abc", "-1", "86401", "nan"):
        with pytest.raises(ValueError, match="KINEMA_STUDENT_RESTORE_SECONDS"):
            job_settings(env | {"KINEMA_STUDENT_RESTORE_SECONDS": bad})
