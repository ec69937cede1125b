"""Artifact stores: a local folder and a real S3 server (SeaweedFS), behind one interface."""

import hashlib
import io
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest

from kinema.errors import InvalidInput, NotFound, Unavailable
from kinema.processes import free_ports
from kinema.processes import group_alive as _group_alive
from kinema.storage.artifacts import (
    PROVENANCE_SUFFIX,
    ArtifactCorrupt,
    LocalArtifactStore,
    Provenance,
    S3ArtifactStore,
    artifact_key,
    store_from_uri,
)
from kinema.storage.s3server import GRPC_OFFSET, S3Server, S3ServerSettings

SHA_A, SHA_B = "a" * 64, "b" * 64


def provenance(**changes) -> Provenance:
    fields = dict(
        pipeline="text_to_image",
        parameters={"prompt": "a red cube", "steps": 4, "cfg": 3.5, "size": [64, 64]},
        seed=7,
        models={"denoiser": SHA_A, "autoencoder": SHA_B},
        parents=(SHA_B,),
    )
    return Provenance(**{**fields, **changes})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- provenance -----------------------------------------------------------------------------------


def test_provenance_json_round_trip_and_normalisation():
    p = provenance(parameters={"size": (64, 64), "name": "é"})
    assert p.parameters == {"size": [64, 64], "name": "é"}  # stored as its JSON round trip
    text = p.to_json()
    assert text.isascii() and " " not in text
    assert Provenance.from_json(text) == p
    assert Provenance.from_dict(p.to_dict()) == p
    assert Provenance.from_dict({**p.to_dict(), "from_a_newer_writer": 1}) == p
    assert p.created_utc.endswith("Z")


@pytest.mark.parametrize(
    "changes",
    [
        {"pipeline": ""},
        {"parameters": {"x": float("nan")}},
        {"parameters": {"x": object()}},
        {"parameters": [1, 2]},
        {"seed": True},
        {"seed": 1.5},
        {"models": {"denoiser": "not-a-sha"}},
        {"parents": SHA_A},
        {"parents": ("A" * 64,)},
        {"created_utc": "2026-01-01T00:00:00"},  # no zone
        {"created_utc": "yesterday"},
    ],
)
def test_provenance_rejects_bad_fields(changes):
    with pytest.raises(InvalidInput):
        provenance(**changes)


def test_provenance_from_bad_json():
    with pytest.raises(InvalidInput):
        Provenance.from_json("{not json")
    with pytest.raises(InvalidInput):
        Provenance.from_json('{"pipeline": "x"}')  # no created_utc


# -- both stores ----------------------------------------------------------------------------------


def test_round_trip_bytes_and_provenance(store):
    data = b"\x89PNG fake image bytes"
    p = provenance()
    artifact = store.put(data, "image/png", p, tenant="acme")
    assert (artifact.sha256, artifact.size_bytes, artifact.media_type) == (sha(data), len(data), "image/png")
    assert artifact.tenant == "acme" and artifact.provenance == p
    assert artifact.uri.startswith("file:///" if isinstance(store, LocalArtifactStore) else "s3://")
    assert artifact.uri.endswith(artifact_key("acme", sha(data)))
    assert store.exists(artifact.sha256, "acme")
    assert store.stat(artifact.sha256, "acme") == artifact
    assert store.get(artifact.sha256, "acme") == data
    with store.open(artifact.sha256, "acme") as f:
        assert f.read(4) + f.read() == data


def test_put_without_provenance_and_from_a_stream(store):
    data = os.urandom(100_000)
    artifact = store.put(io.BytesIO(data), "application/octet-stream")
    assert artifact.tenant == "default" and artifact.provenance is None
    assert store.stat(artifact.sha256).provenance is None
    assert store.get(artifact.sha256) == data
    empty = store.put(b"", "text/plain; charset=utf-8")
    assert store.get(empty.sha256) == b"" and store.stat(empty.sha256).media_type == "text/plain; charset=utf-8"


def test_same_bytes_same_artifact_and_no_second_write(store, monkeypatch):
    data = b"the same bytes"
    first = store.put(data, "image/png", provenance(seed=1))
    if isinstance(store, LocalArtifactStore):
        files = sorted(p for p in store.root.rglob("*") if p.is_file())
        before = [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
        monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("a second put renamed a file into place"))
    else:
        monkeypatch.setattr(store._client, "put_object", lambda *a, **k: pytest.fail("a second put wrote an object"))
    second = store.put(io.BytesIO(data), "image/jpeg", provenance(seed=2))
    assert second == first  # the first media type and provenance stay
    if isinstance(store, LocalArtifactStore):
        files = sorted(p for p in store.root.rglob("*") if p.is_file())
        assert [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == before


def test_large_provenance_round_trip(store):
    p = provenance(parameters={"prompt": "a very long prompt " * 300})  # > S3's 2 KB metadata limit
    artifact = store.put(b"with a long story", "image/png", p)
    assert store.stat(artifact.sha256).provenance == p
    assert store.list() == [artifact]
    if isinstance(store, S3ArtifactStore):  # kept as a sibling object, written before the data
        key = artifact_key("default", artifact.sha256)
        assert store._client.stat_object(store.bucket, key + PROVENANCE_SUFFIX).size == len(p.to_json())


@pytest.mark.parametrize("replacement", [b"tampered bytes!!", b"short"], ids=["same-size", "other-size"])
def test_tampered_bytes_fail_the_integrity_check(store, tamper, replacement):
    artifact = store.put(b"original bytes!!", "application/octet-stream")
    tamper(store, artifact, replacement)
    with pytest.raises(ArtifactCorrupt, match=artifact.sha256):
        store.get(artifact.sha256)
    with store.open(artifact.sha256) as f, pytest.raises(ArtifactCorrupt):
        f.read()


def test_presigned_url(store):
    data = b"download me"
    artifact = store.put(data, "image/png")
    url = store.presigned_url(artifact.sha256, expires=timedelta(seconds=2))
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == data
    if isinstance(store, LocalArtifactStore):
        assert url == artifact.uri  # a plain file URI: documented not to expire
        return
    time.sleep(3)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url, timeout=5)
    assert caught.value.code == 403  # SeaweedFS enforces the expiry: AccessDenied "Request has expired"


def test_sign_presigns_an_artifact_in_hand(store):
    """`sign` is presigned_url without its existence check: the same URL for an artifact put or stat has answered."""
    data = b"signed without asking again"
    artifact = store.put(data, "image/png", tenant="acme")
    url = store.sign(artifact, timedelta(seconds=60))
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == data
    assert url.split("?")[0] == store.presigned_url(artifact.sha256, "acme", timedelta(seconds=60)).split("?")[0]
    assert store.sign(store.stat(artifact.sha256, "acme"), timedelta(seconds=60)).split("?")[0] == url.split("?")[0]
    with pytest.raises(InvalidInput):
        store.sign(artifact, timedelta(days=7, seconds=1))


def test_unknown_artifact_is_not_found(store):
    store.put(b"something else", "image/png")
    assert not store.exists(SHA_A)
    for call in (store.stat, store.get, store.open, store.presigned_url):
        with pytest.raises(NotFound):
            call(SHA_A)


@pytest.mark.parametrize("tenant", ["", "a/b", "..", ".hidden", "Acme", "x" * 64, "a b", None])
def test_bad_tenant_is_invalid(store, tenant):
    for call in (
        lambda: store.put(b"x", "image/png", tenant=tenant),
        lambda: store.get(SHA_A, tenant),
        lambda: store.stat(SHA_A, tenant),
        lambda: store.exists(SHA_A, tenant),
        lambda: store.list(tenant),
    ):
        with pytest.raises(InvalidInput) as caught:
            call()
        assert caught.value.field == "tenant"


def test_bad_arguments_are_invalid(store):
    artifact = store.put(b"x", "image/png")
    for bad_sha in ("abc", SHA_A.upper(), "../" + SHA_A[3:], 42):
        with pytest.raises(InvalidInput):
            store.get(bad_sha)
    for expires in (timedelta(days=7, seconds=1), timedelta(0), timedelta(seconds=1.5), 60):
        with pytest.raises(InvalidInput):
            store.presigned_url(artifact.sha256, expires=expires)
    for media_type in ("", "png", "image/png\r\nX-Evil: 1", "image/é"):
        with pytest.raises(InvalidInput):
            store.put(b"x", media_type)
    with pytest.raises(InvalidInput):
        store.put(b"x", "image/png", provenance={"pipeline": "x"})
    with pytest.raises(InvalidInput):
        store.put("text, not bytes", "text/plain")
    with pytest.raises(InvalidInput):
        store.list(limit=0)


def test_tenants_are_isolated(store):
    data = b"shared bytes"
    a = store.put(data, "image/png", provenance(seed=1), tenant="tenant-a")
    b = store.put(data, "image/png", provenance(seed=2), tenant="tenant-b")
    assert a.sha256 == b.sha256 and a.uri != b.uri
    assert (a.provenance.seed, b.provenance.seed) == (1, 2)  # two artifacts, not one
    only_a = store.put(b"a's secret", "image/png", tenant="tenant-a")
    assert not store.exists(only_a.sha256, "tenant-b")
    with pytest.raises(NotFound):
        store.stat(only_a.sha256, "tenant-b")
    with pytest.raises(NotFound):
        store.get(only_a.sha256, "tenant-b")
    assert {x.sha256 for x in store.list("tenant-b")} == {a.sha256}


def test_list(store):
    assert store.list("nobody") == []
    made = [store.put(bytes([i]) * 10, "image/png", provenance(seed=i), tenant="lister") for i in range(5)]
    store.put(b"other", "image/png", tenant="other")
    listed = store.list("lister")
    assert listed == sorted(made, key=lambda a: a.sha256)
    assert store.list("lister", limit=2) == listed[:2]


def test_check(store):
    store.check()


def test_a_failing_stream_leaves_nothing(store):
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise OSError("disk went away")

    with pytest.raises(InvalidInput, match="disk went away"):
        store.put(io.BufferedReader(Broken()), "image/png", tenant="broken")
    assert store.list("broken") == []
    if isinstance(store, LocalArtifactStore):
        assert [p for p in store.root.rglob("*") if p.is_file()] == []


# -- the local folder ------------------------------------------------------------------------------


def test_local_crash_between_data_and_metadata(local_store):
    data = b"half committed"
    artifact = local_store.put(data, "image/png", provenance())
    data_path = local_store.root / artifact_key("default", artifact.sha256)
    Path(str(data_path) + ".json").unlink()  # as if the process died before the sidecar was renamed in
    (local_store.root / ".tmp" / "put.crashed.tmp").write_bytes(b"partial")
    assert not local_store.exists(artifact.sha256)
    with pytest.raises(NotFound):
        local_store.get(artifact.sha256)
    assert local_store.list() == []
    again = local_store.put(data, "image/png", provenance())  # the next put completes it
    assert local_store.get(again.sha256) == data and local_store.list() == [again]


def test_local_layout_and_uri(tmp_path):
    store = store_from_uri((tmp_path / "a b").as_uri())
    assert isinstance(store, LocalArtifactStore) and store.root == (tmp_path / "a b")
    artifact = store.put(b"x", "image/png", tenant="t")
    assert (tmp_path / "a b" / "t" / artifact.sha256[:2] / artifact.sha256).read_bytes() == b"x"
    assert Path(urllib.request.url2pathname(artifact.uri.removeprefix("file://"))).read_bytes() == b"x"
    assert isinstance(store_from_uri(str(tmp_path / "plain")), LocalArtifactStore)


# -- S3 -------------------------------------------------------------------------------------------


def test_large_object_multipart_round_trip(s3_store):
    data, p = os.urandom(20_000_000), provenance()
    artifact = s3_store.put(io.BytesIO(data), "video/mp4", p)
    etag = s3_store._client.stat_object(s3_store.bucket, artifact_key("default", artifact.sha256)).etag
    assert etag.endswith("-3")  # three 8 MiB parts: a multipart upload
    assert s3_store.stat(artifact.sha256).provenance == p
    assert s3_store.get(artifact.sha256) == data
    with s3_store.open(artifact.sha256) as f:
        chunks = iter(lambda: f.read(1 << 20), b"")
        assert hashlib.sha256(b"".join(chunks)).hexdigest() == artifact.sha256


def test_store_from_uri_s3(s3_server):
    env = {"KINEMA_S3_ACCESS_KEY": s3_server.access_key, "KINEMA_S3_SECRET_KEY": s3_server.secret_key}
    store = store_from_uri(f"s3://from-uri?endpoint={s3_server.endpoint}&secure=0", environ=env)
    assert isinstance(store, S3ArtifactStore) and store.bucket == "from-uri" and not store.secure
    artifact = store.put(b"via uri", "image/png")
    assert store.get(artifact.sha256) == b"via uri"


@pytest.mark.parametrize(
    "uri",
    [
        "s3://key:secret@bucket?endpoint=127.0.0.1:9000",
        "s3://bucket",
        "s3://bucket/prefix?endpoint=127.0.0.1:9000",
        "s3://bucket?endpoint=127.0.0.1:9000&colour=blue",
        "s3://bucket?endpoint=127.0.0.1:9000&endpoint=127.0.0.1:9001",
        "s3://bucket?endpoint=http://127.0.0.1:9000",
        "s3://Bad_Bucket?endpoint=127.0.0.1:9000",
        "s3://bucket?endpoint=127.0.0.1:9000&secure=maybe",
        "gs://bucket",
        "file://host/path",
        "",
    ],
)
def test_store_from_bad_uri(uri):
    with pytest.raises(InvalidInput):
        store_from_uri(uri, environ={"KINEMA_S3_ACCESS_KEY": "key", "KINEMA_S3_SECRET_KEY": "secret"})


def test_store_from_uri_needs_credentials():
    with pytest.raises(InvalidInput, match="KINEMA_S3_ACCESS_KEY"):
        store_from_uri("s3://bucket?endpoint=127.0.0.1:9000", environ={})
    store = store_from_uri("s3://bucket?endpoint=127.0.0.1:9000", "key", "secret", environ={})
    assert isinstance(store, S3ArtifactStore)  # nothing contacted yet


def test_wrong_credentials_are_unavailable(s3_server):
    store = S3ArtifactStore(s3_server.endpoint, s3_server.access_key, "wrong-secret", "creds")
    with pytest.raises(Unavailable, match="KINEMA_S3_SECRET_KEY") as caught:
        store.put(b"x", "image/png")
    assert caught.value.reason == "S3_ACCESS_DENIED"


@pytest.mark.slow
def test_s3_down_is_unavailable_quickly_and_recovers(tmp_path, s3_server):
    server = S3Server(S3ServerSettings(data_dir=tmp_path / "data"), log_path=tmp_path / "weed.log")
    with server:
        # A second server beside the session's: its ten ports (five and five + 10000) do not collide.
        ports = set(server.resolved_settings.ports.values()) | set(s3_server.resolved_settings.ports.values())
        assert len(ports) == 10 and all(p + GRPC_OFFSET <= 65535 for p in ports)
        store = S3ArtifactStore(server.endpoint, server.access_key, server.secret_key, "downtime")
        before = store.put(b"stored before", "image/png", provenance())
    assert server.poll() is not None and not _group_alive(server.pid)
    server.stop()  # idempotent
    during = b"written while down"
    calls = {
        "put": lambda: store.put(during, "image/png", provenance()),
        "get": lambda: store.get(before.sha256),
        "stat": lambda: store.stat(before.sha256),
        "exists": lambda: store.exists(before.sha256),
        "list": lambda: store.list(),
        "presign": lambda: store.presigned_url(before.sha256),
        "check": store.check,
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(Unavailable, match=f"S3 at {server.endpoint} did not answer") as caught:
            call()
        assert time.monotonic() - started < 5, name
        assert caught.value.reason == "S3_UNAVAILABLE"
    with S3Server(server.resolved_settings, log_path=tmp_path / "weed-2.log"):  # same data, same ports
        assert store.get(before.sha256) == b"stored before"  # the same store object recovers
        assert not store.exists(sha(during))  # nothing half-written
        assert store.put(during, "image/png").sha256 == sha(during)
        assert [a.sha256 for a in store.list()] == sorted([before.sha256, sha(during)])
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{server.resolved_settings.s3_port}.sock"))


@pytest.mark.slow
def test_server_killed_mid_multipart_upload_leaves_nothing(tmp_path, monkeypatch):
    server = S3Server(S3ServerSettings(data_dir=tmp_path / "data"), log_path=tmp_path / "weed.log")
    with server:
        store = S3ArtifactStore(server.endpoint, server.access_key, server.secret_key, "killed")
        store.check()
        data = os.urandom(20_000_000)
        upload_part = store._client._upload_part  # minio's per-part call: hold the upload open after a part
        part_sent = threading.Event()

        def slow_upload_part(*args, **kwargs):
            etag = upload_part(*args, **kwargs)
            part_sent.set()
            time.sleep(2)
            return etag

        monkeypatch.setattr(store._client, "_upload_part", slow_upload_part)
        outcome: list[BaseException | None] = []

        def put() -> None:
            try:
                store.put(data, "video/mp4", provenance())
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        thread = threading.Thread(target=put)
        thread.start()
        assert part_sent.wait(30)
        os.killpg(server.pid, signal.SIGKILL)
        thread.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], Unavailable)
    with S3Server(server.resolved_settings, log_path=tmp_path / "weed-2.log"):
        assert not store.exists(sha(data))
        assert list(store._client.list_objects(store.bucket, recursive=True)) == []
        monkeypatch.undo()
        assert store.put(data, "video/mp4").sha256 == sha(data)  # and the retry succeeds whole
        assert store.get(sha(data)) == data


def test_s3_server_fails_fast_with_the_reason_when_a_port_is_taken(tmp_path):
    with socket.socket() as taken:
        # A port the settings accept (weed needs P + 10000 too, so P <= 55535), not whatever port 0 gives.
        taken.bind(("127.0.0.1", free_ports("127.0.0.1", 1, offset=GRPC_OFFSET)[0]))
        taken.listen()
        server = S3Server(S3ServerSettings(data_dir=tmp_path, s3_port=taken.getsockname()[1]))
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"weed exited with status 1 .*not available"), server:
            pass
        assert time.monotonic() - started < 10
    assert server.poll() == 1 and not _group_alive(server.pid)


@pytest.mark.parametrize(
    "ports",
    [
        {"s3_port": 60000},
        {"s3_port": -1},
        {"s3_port": 20000, "filer_port": 20000},
        {"s3_port": 20000, "admin_port": 30000},
    ],
)
def test_s3_server_settings_reject_bad_ports(ports):
    with pytest.raises(InvalidInput):
        S3ServerSettings(**ports)
