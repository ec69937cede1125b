"""`python -m kinema.storage.model_repository` against the session's real S3 server (SeaweedFS): the copy a job
worker makes of the repository Triton serves from a bucket (the chart's distillation init container)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from minio import Minio

from kinema.errors import InvalidInput
from kinema.rpc.process import REPO
from kinema.storage.model_repository import local_path, parse_uri
from kinema.storage.s3server import S3Server

OBJECTS = {
    "models/v1/denoiser/config.pbtxt": b"name: 'denoiser'",
    "models/v1/denoiser/1/mmdit.safetensors": b"\x00weights",
    "models/v1/probe/probe.safetensors": b"probe",
    "models/v2/denoiser/config.pbtxt": b"other version",
    "elsewhere/x": b"not the repository",
}


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
    client.make_bucket("kinema-models")
    for name, data in OBJECTS.items():
        client.put_object("kinema-models", name, io.BytesIO(data), len(data))
    return "kinema-models"


def _copy(s3: S3Server, uri: str, dest, *, secret: str | None = None) -> subprocess.CompletedProcess:
    env = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": secret or s3.secret_key,
           "AWS_DEFAULT_REGION": "us-east-1", "PYTHONPATH": str(REPO / "shared")}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "kinema.storage.model_repository", uri, str(dest), "--secure", "0"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_every_object_under_the_prefix_lands_at_its_relative_path(s3_server, bucket, tmp_path):
    # Triton's own argument, passed through unchanged, as the chart does
    proc = _copy(s3_server, f"--model-repository=s3://{s3_server.endpoint}/{bucket}/models/v1/", tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    got = {str(p.relative_to(tmp_path / "m")): p.read_bytes() for p in (tmp_path / "m").rglob("*") if p.is_file()}
    assert got == {name.removeprefix("models/v1/"): data for name, data in OBJECTS.items()
                   if name.startswith("models/v1/")}  # fmt: skip
    assert "copied 3 files" in proc.stdout


def test_an_empty_prefix_bad_keys_or_a_bad_uri_fail_in_one_line(s3_server, bucket, tmp_path):
    empty = _copy(s3_server, f"s3://{s3_server.endpoint}/{bucket}/models/v3", tmp_path / "e")
    assert empty.returncode == 1 and "no model repository at s3://" in empty.stderr
    denied = _copy(s3_server, f"s3://{s3_server.endpoint}/{bucket}/models/v1", tmp_path / "d", secret="wrong")
    assert denied.returncode == 1 and "Traceback" not in denied.stderr and len(denied.stderr.splitlines()) == 1
    bad = _copy(s3_server, "http://example/bucket", tmp_path / "b")
    assert bad.returncode == 1 and "expected s3://HOST[:PORT]/BUCKET" in bad.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "b").exists()


def test_uris_parse_and_names_stay_inside_the_destination(tmp_path):
    assert parse_uri("s3://minio:9000/kinema-models/models/v1") == ("minio:9000", "kinema-models", "models/v1/")
    assert parse_uri("--model-repository=s3://h/b") == ("h", "b", "")
    assert local_path(tmp_path, "denoiser/1/w.safetensors") == tmp_path / "denoiser" / "1" / "w.safetensors"
    for name in ("../escape", "a/../../b", "/abs", ""):
        with pytest.raises(InvalidInput):
            local_path(tmp_path, name)
