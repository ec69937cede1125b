"""A real S3 server (SeaweedFS) for the session, and both artifact stores over it and a temporary folder."""

import io
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kinema.storage.artifacts import Artifact, ArtifactStore, LocalArtifactStore, S3ArtifactStore, artifact_key
from kinema.storage.s3server import S3Server, S3ServerSettings

_BUCKETS = itertools.count()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    root = tmp_path_factory.mktemp("s3")
    with S3Server(S3ServerSettings(data_dir=root / "data"), log_path=root / "weed.log") as server:
        yield server


@pytest.fixture
def s3_store(s3_server: S3Server) -> S3ArtifactStore:
    """A store on a bucket of its own, so tests share the server but not their objects."""
    return S3ArtifactStore(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, f"test-{next(_BUCKETS)}")


@pytest.fixture
def local_store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ArtifactStore:
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def tamper() -> Callable[[ArtifactStore, Artifact, bytes], None]:
    """Replace an artifact's stored bytes behind the store's back (its metadata stays)."""

    def replace(store: ArtifactStore, artifact: Artifact, data: bytes) -> None:
        if isinstance(store, LocalArtifactStore):
            (store.root / artifact_key(artifact.tenant, artifact.sha256)).write_bytes(data)
        else:
            assert isinstance(store, S3ArtifactStore)
            key = artifact_key(artifact.tenant, artifact.sha256)
            meta = {k: v for k, v in store._client.stat_object(store.bucket, key).metadata.items()}
            user = {k: v for k, v in meta.items() if k.lower().startswith("x-amz-meta-")}
            store._client.put_object(store.bucket, key, io.BytesIO(data), len(data), metadata=user)

    return replace
