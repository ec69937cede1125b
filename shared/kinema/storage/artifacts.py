"""Content-addressed artifact store: S3 through the minio SDK, or a local folder in embedded mode.

An artifact is a blob named by its sha256 inside a tenant (key `<tenant>/<sha256[:2]>/<sha256>`), with a
media type and an optional `Provenance`. Both stores write an artifact whole or not at all, never rewrite
one they already hold, and check the hash on every read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast
from urllib.parse import parse_qs, urlsplit
from urllib.request import url2pathname

from kinema.errors import DataLoss, InvalidInput, KinemaError, NotFound, ResourceExhausted, Unavailable

if TYPE_CHECKING:
    from minio import Minio
    from minio.datatypes import Object
    from minio.error import S3Error

_LOGGER = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
DEFAULT_EXPIRY = timedelta(hours=1)
MAX_EXPIRY = timedelta(days=7)  # the longest a SigV4 presigned URL may live
MAX_LIST = 1000
ENV_ACCESS_KEY = "KINEMA_S3_ACCESS_KEY"
ENV_SECRET_KEY = "KINEMA_S3_SECRET_KEY"

_CHUNK = 1 << 20
_SPOOL_IN_MEMORY = 32 << 20  # a streamed upload larger than this is spooled to a temporary file
_PART_SIZE = 8 << 20  # S3 multipart part size (S3 wants >= 5 MiB)
# S3 limits user metadata to 2 KB (keys and values together); larger provenance goes to a sibling object.
_METADATA_BUDGET = 2000
_META_SHA = "x-amz-meta-kinema-sha256"
_META_PROVENANCE = "x-amz-meta-kinema-provenance"
_META_PROVENANCE_SHA = "x-amz-meta-kinema-provenance-sha256"
PROVENANCE_SUFFIX = ".provenance.json"

_SHA256 = re.compile(r"[0-9a-f]{64}")
# Lower case only: on a case-insensitive file system (a laptop's) "Acme" and "acme" would share a folder.
_TENANT = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*(;[ -~]*)?")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ArtifactCorrupt(DataLoss):
    """Stored bytes or metadata do not match the artifact's hash: data loss in the store, not a client error."""


# -- validation -----------------------------------------------------------------------------------


def check_sha256(sha256: object, field: str = "sha256") -> str:
    """`sha256` if it is 64 lower-case hex digits, else InvalidInput."""
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise InvalidInput(
            f"{field} must be 64 lower-case hex digits, got {sha256!r:.80}", reason="INVALID_SHA256", field=field
        )
    return sha256


def check_tenant(tenant: object) -> str:
    """`tenant` if it is 1-63 of [a-z0-9._-] starting with a letter or digit (so never '', '..' or 'a/b')."""
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise InvalidInput(
            f"tenant must be 1-63 characters of a-z, 0-9, '.', '_', '-' starting with a letter or digit, "
            f"got {tenant!r:.80}",
            reason="INVALID_TENANT",
            field="tenant",
        )
    return tenant


def check_media_type(media_type: object) -> str:
    if not isinstance(media_type, str) or len(media_type) > 255 or not _MEDIA_TYPE.fullmatch(media_type):
        raise InvalidInput(
            f"media_type must look like 'image/png' (ASCII, at most 255 characters), got {media_type!r:.80}",
            reason="INVALID_MEDIA_TYPE",
            field="media_type",
        )
    return media_type


def check_expiry(expires: object) -> timedelta:
    if not isinstance(expires, timedelta) or not timedelta(seconds=1) <= expires <= MAX_EXPIRY:
        raise InvalidInput(
            f"expires must be a timedelta between 1 s and 7 days, got {expires!r}", reason="INVALID_EXPIRY"
        )
    if expires.microseconds:
        raise InvalidInput(f"expires must be whole seconds, got {expires!r}", reason="INVALID_EXPIRY")
    return expires


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
        raise InvalidInput(f"limit must be an int between 1 and {MAX_LIST}, got {limit!r}", field="limit")
    return limit


def artifact_key(tenant: str, sha256: str) -> str:
    """The object key of an artifact: `<tenant>/<sha256[:2]>/<sha256>`."""
    check_tenant(tenant)
    check_sha256(sha256)
    return f"{tenant}/{sha256[:2]}/{sha256}"


# -- domain types ---------------------------------------------------------------------------------


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Provenance:
    """How an artifact was made.

    `parameters` holds JSON values only and is stored as its JSON round trip (tuples become lists), so
    `Provenance.from_json(p.to_json()) == p`. `models` maps a model name to its checkpoint's sha256 and
    `parents` lists the sha256 of the artifacts this one was made from.
    """

    pipeline: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    models: Mapping[str, str] = field(default_factory=dict)
    parents: tuple[str, ...] = ()
    created_utc: str = field(default_factory=_utc_now)

    def __post_init__(self) -> None:
        if not isinstance(self.pipeline, str) or not self.pipeline.strip():
            raise InvalidInput(
                f"provenance.pipeline must be a non-empty string, got {self.pipeline!r:.80}",
                field="provenance.pipeline",
            )
        if not isinstance(self.parameters, Mapping):
            raise InvalidInput("provenance.parameters must be a mapping", field="provenance.parameters")
        try:
            parameters = json.loads(json.dumps(dict(self.parameters), allow_nan=False, sort_keys=True))
        except (TypeError, ValueError) as e:
            raise InvalidInput(
                f"provenance.parameters must hold JSON values only: {e}", field="provenance.parameters"
            ) from None
        object.__setattr__(self, "parameters", parameters)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidInput(f"provenance.seed must be an int or None, got {self.seed!r}", field="provenance.seed")
        if not isinstance(self.models, Mapping):
            raise InvalidInput("provenance.models must map model names to sha256", field="provenance.models")
        for name, digest in self.models.items():
            if not isinstance(name, str) or not name:
                raise InvalidInput(f"provenance.models has a bad model name {name!r}", field="provenance.models")
            check_sha256(digest, f"provenance.models[{name!r}]")
        object.__setattr__(self, "models", dict(sorted(self.models.items())))
        if isinstance(self.parents, str) or not isinstance(self.parents, tuple | list):
            raise InvalidInput("provenance.parents must be a sequence of sha256", field="provenance.parents")
        object.__setattr__(self, "parents", tuple(self.parents))
        for i, parent in enumerate(self.parents):
            check_sha256(parent, f"provenance.parents[{i}]")
        try:
            stamp = datetime.fromisoformat(self.created_utc)
        except (TypeError, ValueError):
            stamp = None
        if stamp is None or stamp.utcoffset() is None:
            raise InvalidInput(
                f"provenance.created_utc must be an ISO 8601 time with a zone, got {self.created_utc!r:.80}",
                field="provenance.created_utc",
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "parameters": self.parameters,
            "seed": self.seed,
            "models": dict(self.models),
            "parents": list(self.parents),
            "created_utc": self.created_utc,
        }

    def to_json(self) -> str:
        """Compact, key-sorted, ASCII-only JSON (it travels in HTTP headers)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        """The inverse of `to_dict`; keys it does not know (from a newer writer) are ignored."""
        if not isinstance(data, Mapping) or "pipeline" not in data or "created_utc" not in data:
            raise InvalidInput("provenance needs at least 'pipeline' and 'created_utc'", field="provenance")
        return cls(
            pipeline=data["pipeline"],
            parameters=data.get("parameters") or {},
            seed=data.get("seed"),
            models=data.get("models") or {},
            parents=tuple(data.get("parents") or ()),
            created_utc=data["created_utc"],
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Provenance:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise InvalidInput(f"provenance is not valid JSON: {e}", field="provenance") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class Artifact:
    """What a store knows about one artifact; `uri` says where it lives (s3://bucket/key or file:///path)."""

    sha256: str
    media_type: str
    size_bytes: int
    uri: str
    provenance: Provenance | None
    tenant: str


class ArtifactStore(Protocol):
    """Content-addressed, tenant-scoped artifact storage; S3 in the cluster, a folder in embedded mode.

    `put` of bytes a tenant already holds returns the stored artifact (with the provenance it was first
    stored with) and writes nothing. Reads check the sha256 and raise `ArtifactCorrupt` on a mismatch.
    """

    def put(
        self, data: bytes | BinaryIO, media_type: str, provenance: Provenance | None = None, tenant: str = ...
    ) -> Artifact: ...

    def get(self, sha256: str, tenant: str = ...) -> bytes: ...

    def open(self, sha256: str, tenant: str = ...) -> BinaryIO:
        """A stream of the bytes; verified when read to the end (a reader that stops early gets unchecked bytes)."""
        ...

    def stat(self, sha256: str, tenant: str = ...) -> Artifact: ...

    def exists(self, sha256: str, tenant: str = ...) -> bool: ...

    def presigned_url(self, sha256: str, tenant: str = ..., expires: timedelta = ...) -> str: ...

    def sign(self, artifact: Artifact, expires: timedelta = ...) -> str:
        """`presigned_url` of an artifact `put` or `stat` has just answered: no round trip to check it exists."""
        ...

    def list(self, tenant: str = ..., limit: int = ...) -> list[Artifact]:
        """Up to `limit` artifacts of `tenant`, in sha256 order."""
        ...

    def check(self) -> None:
        """Raise `Unavailable` unless the store can be written to (a readiness probe)."""
        ...


# -- streaming helpers ----------------------------------------------------------------------------


def _check_provenance(provenance: object) -> Provenance | None:
    if provenance is not None and not isinstance(provenance, Provenance):
        raise InvalidInput(f"provenance must be a Provenance or None, got {type(provenance).__name__}")
    return provenance


def _copy_hashing(data: bytes | BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy `data` (bytes or a binary stream) into `dst`; return its sha256 and size."""
    digest = hashlib.sha256()
    if isinstance(data, bytes | bytearray | memoryview):
        digest.update(data)
        dst.write(data)
        return digest.hexdigest(), memoryview(data).nbytes
    if not callable(getattr(data, "read", None)):
        raise InvalidInput(f"data must be bytes or a binary stream, got {type(data).__name__}", field="data")
    size = 0
    while True:
        try:
            chunk = data.read(_CHUNK)
        except OSError as e:  # the caller's stream, not the store, failed
            raise InvalidInput(f"reading data failed: {e}", field="data") from e
        if not chunk:
            break
        if not isinstance(chunk, bytes | bytearray):
            raise InvalidInput("data must be a binary stream (its read() returned text)", field="data")
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


class _VerifiedReader(io.RawIOBase):
    """Hashes the bytes that pass through; at the end of the stream raises `ArtifactCorrupt` unless they match."""

    def __init__(
        self,
        source: Any,
        sha256: str,
        what: str,
        release: Callable[[], None],
        failure: Callable[[Exception], KinemaError],
        errors: tuple[type[Exception], ...],
    ) -> None:
        super().__init__()
        self._source, self._sha256, self._what = source, sha256, what
        self._release, self._failure, self._errors = release, failure, errors
        self._digest = hashlib.sha256()
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._done:
            return 0
        try:
            n = self._source.readinto(buffer)
        except self._errors as e:
            raise self._failure(e) from e
        if n:
            self._digest.update(memoryview(buffer)[:n])
            return n
        self._done = True
        if self._digest.hexdigest() != self._sha256:
            raise ArtifactCorrupt(
                f"{self._what} is corrupt: its bytes hash to {self._digest.hexdigest()}", reason="ARTIFACT_CORRUPT"
            )
        return 0

    def close(self) -> None:
        if not self.closed:
            try:
                self._release()
            finally:
                super().close()


def _verified(raw: _VerifiedReader) -> BinaryIO:
    return cast(BinaryIO, io.BufferedReader(raw, _CHUNK))


# -- embedded mode: a local folder ----------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable; not every platform can open a directory (Windows), hence best effort.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalArtifactStore:
    """Embedded mode: `<root>/<tenant>/<sha256[:2]>/<sha256>` holds the bytes, `<...>.json` next to it the metadata.

    Both files are written under a temporary name, fsynced and renamed into place, the data first: the sidecar
    is the commit mark, so a reader that finds it finds the whole data file, and a crash in between leaves a data
    file nobody sees until the next put of the same bytes completes it. `presigned_url` returns a plain file://
    URI: whoever can read the folder can read the file, and the expiry is checked for range but not enforced.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self._tmp = self.root / ".tmp"  # same file system as the artifacts, so os.replace is atomic
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unavailable(f"cannot create the artifact folder {self.root}: {e.strerror}") from e

    def __repr__(self) -> str:
        return f"LocalArtifactStore({str(self.root)!r})"

    def _paths(self, tenant: str, sha256: str) -> tuple[Path, Path]:
        data = self.root / artifact_key(tenant, sha256)
        return data, data.with_name(data.name + ".json")

    @contextlib.contextmanager
    def _io_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"no space left to {action} under {self.root}") from e
            raise Unavailable(f"cannot {action} under {self.root}: {e.strerror or e}") from e

    def _write_atomic(self, path: Path, payload: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def put(
        self,
        data: bytes | BinaryIO,
        media_type: str,
        provenance: Provenance | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> Artifact:
        check_tenant(tenant)
        check_media_type(media_type)
        _check_provenance(provenance)
        with self._io_errors("write an artifact"):
            fd, tmp = tempfile.mkstemp(prefix="put.", suffix=".tmp", dir=self._tmp)
            try:
                with os.fdopen(fd, "wb") as f:
                    sha256, size = _copy_hashing(data, f)
                    f.flush()
                    os.fsync(f.fileno())
                data_path, meta_path = self._paths(tenant, sha256)
                try:
                    existing: Artifact | None = self.stat(sha256, tenant)
                except (NotFound, ArtifactCorrupt):
                    existing = None  # absent, or rewritten whole below
                if existing is not None and data_path.stat().st_size == size:
                    return existing  # already stored: write nothing
                data_path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, data_path)
                _fsync_dir(data_path.parent)
                if existing is None:  # else a repair of the data only: the first provenance stays
                    meta = {"sha256": sha256, "media_type": media_type, "size_bytes": size}
                    meta["provenance"] = provenance.to_dict() if provenance else None
                    self._write_atomic(meta_path, json.dumps(meta, sort_keys=True).encode())
            finally:
                Path(tmp).unlink(missing_ok=True)
        return self.stat(sha256, tenant)

    def stat(self, sha256: str, tenant: str = DEFAULT_TENANT) -> Artifact:
        data_path, meta_path = self._paths(tenant, sha256)
        what = f"artifact {sha256} of tenant {tenant!r}"
        try:
            text = meta_path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no {what}", reason="ARTIFACT_NOT_FOUND") from None
        except OSError as e:
            raise Unavailable(f"cannot read {what} under {self.root}: {e.strerror}") from e
        try:
            meta = json.loads(text)
            provenance = Provenance.from_dict(meta["provenance"]) if meta.get("provenance") else None
            artifact = Artifact(
                sha256=sha256,
                media_type=meta["media_type"],
                size_bytes=int(meta["size_bytes"]),
                uri=data_path.as_uri(),
                provenance=provenance,
                tenant=tenant,
            )
            ok = meta["sha256"] == sha256
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ArtifactCorrupt(f"the metadata of {what} ({meta_path}) is unreadable", reason="ARTIFACT_CORRUPT")
        if not data_path.is_file():
            raise ArtifactCorrupt(f"the data file of {what} ({data_path}) is missing", reason="ARTIFACT_CORRUPT")
        return artifact

    def open(self, sha256: str, tenant: str = DEFAULT_TENANT) -> BinaryIO:
        artifact = self.stat(sha256, tenant)
        with self._io_errors(f"read artifact {sha256}"):
            f = open(self._paths(tenant, sha256)[0], "rb")  # noqa: SIM115 - closed by the reader
        failure = lambda e: Unavailable(f"cannot read artifact {sha256} under {self.root}: {e}")
        what = f"artifact {sha256} of tenant {tenant!r} ({artifact.uri})"
        return _verified(_VerifiedReader(f, sha256, what, f.close, failure, (OSError,)))

    def get(self, sha256: str, tenant: str = DEFAULT_TENANT) -> bytes:
        with self.open(sha256, tenant) as f:
            return f.read()

    def exists(self, sha256: str, tenant: str = DEFAULT_TENANT) -> bool:
        return self._paths(tenant, sha256)[1].is_file()

    def presigned_url(self, sha256: str, tenant: str = DEFAULT_TENANT, expires: timedelta = DEFAULT_EXPIRY) -> str:
        """A file:// URI of the data; `expires` is range-checked like S3's but a local file does not expire."""
        check_expiry(expires)
        return self.stat(sha256, tenant).uri

    def sign(self, artifact: Artifact, expires: timedelta = DEFAULT_EXPIRY) -> str:
        check_expiry(expires)
        return artifact.uri

    def list(self, tenant: str = DEFAULT_TENANT, limit: int = 100) -> list[Artifact]:
        check_tenant(tenant)
        _check_limit(limit)
        found: list[Artifact] = []
        for meta_path in sorted((self.root / tenant).glob("??/*.json")):
            sha256 = meta_path.name.removesuffix(".json")
            if not _SHA256.fullmatch(sha256):
                continue
            with contextlib.suppress(NotFound):  # removed since the glob
                found.append(self.stat(sha256, tenant))
            if len(found) >= limit:
                break
        return found

    def check(self) -> None:
        if not os.access(self._tmp, os.W_OK):
            raise Unavailable(f"the artifact folder {self.root} is not writable")


# -- S3 -------------------------------------------------------------------------------------------


class S3ArtifactStore:
    """Artifacts in one S3 bucket through the minio SDK (MinIO in the cluster, SeaweedFS on one machine).

    The data object's key is the artifact's key and its Content-Type the media type; user metadata carries the
    sha256 and the provenance JSON, or, when that would pass S3's 2 KB metadata limit, the sha256 of a sibling
    object `<key>.provenance.json` written before the data. A single PUT or a completed multipart upload appears
    whole or not at all, so the data object's existence means the artifact is complete. The bucket is created on
    the first write. Timeouts are short and retries few so that a dead server answers `Unavailable` in seconds.
    `public_endpoint`, when given, is the host:port presigned URLs name (clients outside the cluster); those are
    signed offline for `region` (default us-east-1).
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        public_endpoint: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        retries: int = 2,
    ) -> None:
        for name, value in (("endpoint", endpoint), ("public_endpoint", public_endpoint)):
            if value is not None and (not value or "/" in value or "@" in value):
                raise InvalidInput(f"{name} must be host:port without a scheme or path, got {value!r}", field=name)
        if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise InvalidInput(f"bad S3 bucket name {bucket!r} (3-63 of a-z, 0-9, '.', '-')", field="bucket")
        if not access_key or not secret_key:
            raise InvalidInput(f"S3 credentials missing: set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}")
        if not (connect_timeout > 0 and read_timeout > 0 and retries >= 0):
            raise InvalidInput("timeouts must be > 0 and retries >= 0")
        import certifi
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            # minio's default (5 retries, 5 min timeouts) keeps a caller waiting minutes for a dead server.
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        )
        self.endpoint, self.bucket, self.secure = endpoint, bucket, secure
        self._client: Minio = Minio(endpoint, access_key, secret_key, secure=secure, region=region, http_client=http)
        self._presigner: Minio = self._client
        if public_endpoint:
            self._presigner = Minio(
                public_endpoint, access_key, secret_key, secure=secure, region=region or "us-east-1", http_client=http
            )
        self._bucket_ready = False

    def __repr__(self) -> str:
        return f"S3ArtifactStore(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    # -- errors ---------------------------------------------------------------------------------

    def _unreachable(self, e: Exception, action: str) -> Unavailable:
        import urllib3

        cause = e.reason if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason else e
        return Unavailable(
            f"S3 at {self.endpoint} did not answer while trying to {action} ({type(cause).__name__}: {cause}); "
            "check that the server runs and the endpoint is right, then retry",
            reason="S3_UNAVAILABLE",
        )

    def _s3_error(self, e: S3Error, action: str, missing: str) -> KinemaError:
        if missing and e.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"):
            return NotFound(missing, reason="ARTIFACT_NOT_FOUND")
        if e.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return Unavailable(
                f"S3 at {self.endpoint} refused to {action} ({e.code}); check {ENV_ACCESS_KEY} and {ENV_SECRET_KEY} "
                f"and the rights on bucket {self.bucket!r}",
                reason="S3_ACCESS_DENIED",
            )
        return Unavailable(f"S3 at {self.endpoint} failed to {action}: {e.code}: {e.message}", reason="S3_ERROR")

    @contextlib.contextmanager
    def _errors(self, action: str, missing: str = "") -> Iterator[None]:
        """Map minio and transport errors to domain errors; `missing` is the NotFound message (none: Unavailable)."""
        import urllib3
        from minio.error import InvalidResponseError, S3Error, ServerError

        try:
            yield
        except S3Error as e:
            raise self._s3_error(e, action, missing) from e
        except (ServerError, InvalidResponseError) as e:
            raise Unavailable(f"S3 at {self.endpoint} failed to {action}: {e}", reason="S3_ERROR") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise self._unreachable(e, action) from e

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        from minio.error import S3Error

        with self._errors(f"create bucket {self.bucket!r}"):
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as e:  # another writer made it first
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        self._bucket_ready = True

    # -- the store ------------------------------------------------------------------------------

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(
        self,
        data: bytes | BinaryIO,
        media_type: str,
        provenance: Provenance | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> Artifact:
        check_tenant(tenant)
        check_media_type(media_type)
        _check_provenance(provenance)
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as body:
            # The key is the hash, so the whole input is read (and kept) before anything is sent.
            if isinstance(data, bytes | bytearray | memoryview):
                sha256, size = hashlib.sha256(data).hexdigest(), memoryview(data).nbytes
                source: BinaryIO = cast(BinaryIO, io.BytesIO(data))
            else:
                sha256, size = _copy_hashing(data, cast(BinaryIO, body))
                source = cast(BinaryIO, body)
            key = artifact_key(tenant, sha256)
            self._ensure_bucket()
            with contextlib.suppress(NotFound, ArtifactCorrupt):  # a corrupt one is rewritten below
                existing = self.stat(sha256, tenant)
                if existing.size_bytes == size:
                    return existing
            metadata = {_META_SHA: sha256}
            if provenance is not None:
                text = provenance.to_json()
                if len(_META_SHA) + len(sha256) + len(_META_PROVENANCE) + len(text) <= _METADATA_BUDGET:
                    metadata[_META_PROVENANCE] = text
                else:
                    blob = text.encode()
                    with self._errors(f"write the provenance of artifact {sha256}"):
                        self._client.put_object(
                            self.bucket, key + PROVENANCE_SUFFIX, io.BytesIO(blob), len(blob), "application/json"
                        )
                    metadata[_META_PROVENANCE_SHA] = hashlib.sha256(blob).hexdigest()
            source.seek(0)
            with self._errors(f"write artifact {sha256}"):
                self._client.put_object(
                    self.bucket, key, source, size, media_type, metadata=cast(Any, metadata), part_size=_PART_SIZE
                )
        return Artifact(sha256, media_type, size, self._uri(key), provenance, tenant)

    def stat(self, sha256: str, tenant: str = DEFAULT_TENANT) -> Artifact:
        key = artifact_key(tenant, sha256)
        what = f"artifact {sha256} of tenant {tenant!r}"
        with self._errors(f"stat {what}", missing=f"no {what}"):
            obj = self._client.stat_object(self.bucket, key)
        return Artifact(
            sha256=sha256,
            media_type=obj.content_type or "application/octet-stream",
            size_bytes=int(obj.size or 0),
            uri=self._uri(key),
            provenance=self._provenance(obj, key, what),
            tenant=tenant,
        )

    def _provenance(self, obj: Object, key: str, what: str) -> Provenance | None:
        meta = obj.metadata or {}
        stored_sha = meta.get(_META_SHA)
        if stored_sha is not None and stored_sha != key.rsplit("/", 1)[1]:
            raise ArtifactCorrupt(f"{what} is labelled with sha256 {stored_sha}", reason="ARTIFACT_CORRUPT")
        text: str | bytes | None = meta.get(_META_PROVENANCE)
        sibling_sha = meta.get(_META_PROVENANCE_SHA)
        if text is None and sibling_sha:
            sibling = key + PROVENANCE_SUFFIX
            with self._errors(f"read the provenance of {what}", missing=f"the provenance object of {what} is gone"):
                response = self._client.get_object(self.bucket, sibling)
                try:
                    text = response.read()
                finally:
                    response.close()
                    response.release_conn()
            if hashlib.sha256(text).hexdigest() != sibling_sha:
                raise ArtifactCorrupt(f"the provenance object of {what} is corrupt", reason="ARTIFACT_CORRUPT")
        if text is None:
            return None
        try:
            return Provenance.from_json(text)
        except InvalidInput as e:
            raise ArtifactCorrupt(f"the provenance of {what} is unreadable: {e}", reason="ARTIFACT_CORRUPT") from e

    def open(self, sha256: str, tenant: str = DEFAULT_TENANT) -> BinaryIO:
        import urllib3

        key = artifact_key(tenant, sha256)
        what = f"artifact {sha256} of tenant {tenant!r}"
        with self._errors(f"read {what}", missing=f"no {what}"):
            response = self._client.get_object(self.bucket, key)

        def release() -> None:
            response.close()
            response.release_conn()

        failure = lambda e: self._unreachable(e, f"read {what}")
        errors = (urllib3.exceptions.HTTPError, OSError)
        return _verified(_VerifiedReader(response, sha256, f"{what} ({self._uri(key)})", release, failure, errors))

    def get(self, sha256: str, tenant: str = DEFAULT_TENANT) -> bytes:
        with self.open(sha256, tenant) as f:
            return f.read()

    def exists(self, sha256: str, tenant: str = DEFAULT_TENANT) -> bool:
        key = artifact_key(tenant, sha256)
        try:
            with self._errors(f"stat artifact {sha256}", missing="absent"):
                self._client.stat_object(self.bucket, key)
        except NotFound:
            return False
        return True

    def presigned_url(self, sha256: str, tenant: str = DEFAULT_TENANT, expires: timedelta = DEFAULT_EXPIRY) -> str:
        """A URL anyone may GET the bytes from until `expires` (1 s to 7 days) has passed; NotFound if absent."""
        check_expiry(expires)
        if not self.exists(sha256, tenant):
            raise NotFound(f"no artifact {sha256} of tenant {tenant!r}", reason="ARTIFACT_NOT_FOUND")
        return self._presign(sha256, tenant, expires)

    def sign(self, artifact: Artifact, expires: timedelta = DEFAULT_EXPIRY) -> str:
        check_expiry(expires)
        return self._presign(artifact.sha256, artifact.tenant, expires)

    def _presign(self, sha256: str, tenant: str, expires: timedelta) -> str:
        with self._errors(f"presign artifact {sha256}"):
            return self._presigner.get_presigned_url("GET", self.bucket, artifact_key(tenant, sha256), expires=expires)

    def list(self, tenant: str = DEFAULT_TENANT, limit: int = 100) -> list[Artifact]:
        check_tenant(tenant)
        _check_limit(limit)
        found: list[Artifact] = []
        try:
            with self._errors(f"list the artifacts of tenant {tenant!r}", missing="no bucket"):
                for obj in self._client.list_objects(self.bucket, prefix=f"{tenant}/", recursive=True):
                    sha256 = (obj.object_name or "").rsplit("/", 1)[-1]
                    if not _SHA256.fullmatch(sha256) or obj.object_name != artifact_key(tenant, sha256):
                        continue  # a provenance sibling, or not ours
                    with contextlib.suppress(NotFound):  # removed since the listing
                        found.append(self.stat(sha256, tenant))
                    if len(found) >= limit:
                        break
        except NotFound:
            return []  # the bucket is made on the first write
        return found

    def check(self) -> None:
        self._bucket_ready = False  # ask the server again: this is a probe
        self._ensure_bucket()


# -- from configuration ---------------------------------------------------------------------------

_S3_OPTIONS = ("endpoint", "secure", "region", "public_endpoint")


def _flag(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise InvalidInput(f"{name} must be 0/1 or true/false, got {text!r}")


def store_from_uri(
    uri: str,
    access_key: str | None = None,
    secret_key: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> LocalArtifactStore | S3ArtifactStore:
    """The store a URI names: `file:///path` (or a plain path) or `s3://bucket?endpoint=host:port&secure=0`.

    The s3 query may also set `region` and `public_endpoint`. Credentials never travel in the URI: they come
    from the arguments, else from `KINEMA_S3_ACCESS_KEY` / `KINEMA_S3_SECRET_KEY` in `environ`.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidInput("the artifact store URI is empty", field="artifacts")
    parts = urlsplit(uri)
    if parts.scheme in ("", "file") or len(parts.scheme) == 1:  # one letter: a Windows drive
        if parts.scheme != "file":
            return LocalArtifactStore(Path(uri))
        if parts.netloc not in ("", "localhost") or parts.query or not parts.path:
            raise InvalidInput(f"a file URI must look like file:///absolute/path, got {uri!r}", field="artifacts")
        return LocalArtifactStore(Path(url2pathname(parts.path)))
    if parts.scheme != "s3":
        raise InvalidInput(
            f"the artifact store URI must be file:///path or s3://bucket?endpoint=host:port, got {uri!r}",
            field="artifacts",
        )
    if "@" in parts.netloc:
        raise InvalidInput(
            f"credentials do not belong in the artifact store URI; set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}",
            field="artifacts",
        )
    if parts.path not in ("", "/"):
        raise InvalidInput(f"an s3 URI names a bucket only (no key prefix), got {uri!r}", field="artifacts")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(_S3_OPTIONS))
    if unknown:
        raise InvalidInput(f"unknown s3 URI option(s) {unknown}; known: {list(_S3_OPTIONS)}", field="artifacts")
    if any(len(v) > 1 for v in query.values()):
        raise InvalidInput(f"an s3 URI option is repeated in {uri!r}", field="artifacts")
    options = {k: v[0] for k, v in query.items()}
    if not options.get("endpoint"):
        raise InvalidInput(f"the s3 URI needs ?endpoint=host:port, got {uri!r}", field="artifacts")
    return S3ArtifactStore(
        endpoint=options["endpoint"],
        access_key=access_key or environ.get(ENV_ACCESS_KEY),
        secret_key=secret_key or environ.get(ENV_SECRET_KEY),
        bucket=parts.netloc,
        secure=_flag("secure", options.get("secure", "0")),
        region=options.get("region") or None,
        public_endpoint=options.get("public_endpoint") or None,
    )
