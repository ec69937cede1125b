"""UploadArtifact's checks and storage: a header, then the bytes in chunks, stored whole or not at all.

`Upload` takes the stream's messages in order (`header` first, then `chunk`s), spools the bytes to memory or a
temporary file while hashing them and checks them against the header as they come: an upload over the server's
limit is refused at its header (RESOURCE_EXHAUSTED, reason ARTIFACT_TOO_LARGE, metadata max_bytes), before any
byte is taken. `store` then checks what the bytes are (`kinema.storage.media`: an image's dimensions before any
pixel is decoded, then a full decode; a video's frame size, frame count and duration from its header against the
server's video limits, then its first frame decoded) and puts them into the content-addressed store in the caller's
tenant with an "upload" provenance. Nothing is written before every check has passed, and the store writes whole
objects.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, cast

from kinema.errors import InvalidInput, ResourceExhausted
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.storage.artifacts import Artifact, ArtifactStore, Provenance, check_media_type, check_sha256
from kinema.storage.media import DEFAULT_LIMITS, IMAGE_TYPES, VIDEO_TYPES, MediaLimits, probe

MAX_CHUNK = 1 << 20  # bytes per chunk message (orchestrator.proto)
MAX_FILENAME = 255
_SPOOL_IN_MEMORY = 8 << 20  # larger uploads are spooled to a temporary file
UPLOAD_PIPELINE = "upload"  # Provenance.pipeline of an uploaded artifact


@dataclass(frozen=True)
class UploadLimits:
    """What this server takes: at most `max_bytes`, of `media_types` (those some registered pipeline reads)."""

    max_bytes: int
    media_types: frozenset[str]
    media: MediaLimits = DEFAULT_LIMITS


def accepted_media_types(infos: Iterable[pb.PipelineInfo]) -> frozenset[str]:
    """The media types some pipeline reads for some input (InputInfo.media_types) that can be checked here."""
    readable = set(IMAGE_TYPES) | set(VIDEO_TYPES)
    return frozenset(t for info in infos for i in info.inputs for t in i.media_types if t in readable)


def _media_type(header: pb.UploadHeader, limits: UploadLimits) -> str:
    if not header.media_type:
        raise InvalidInput("header.media_type is required, e.g. 'image/png'", reason="MISSING",
                           field="header.media_type")  # fmt: skip
    try:
        media_type = check_media_type(header.media_type).split(";")[0].strip().lower()
    except InvalidInput as e:
        raise InvalidInput(f"header.{e}", reason=e.reason, field="header.media_type") from None
    if media_type not in limits.media_types:
        accepted = ", ".join(sorted(limits.media_types)) or "none"
        raise InvalidInput(f"no pipeline on this server reads {media_type} (it accepts {accepted})",
                           reason="UNSUPPORTED_MEDIA_TYPE", field="header.media_type",
                           metadata={"accepted": ",".join(sorted(limits.media_types))})  # fmt: skip
    return media_type


class Upload:
    """One upload stream's state; feed it every message in order with `add`, then call `finish`."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.header: pb.UploadHeader | None = None
        self.media_type = ""
        self.received = 0
        self._digest = hashlib.sha256()
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115 - closed by close()
        self._file = cast(BinaryIO, spool)

    def close(self) -> None:
        self._file.close()

    def add(self, message: pb.UploadArtifactRequest) -> None:
        part = message.WhichOneof("part")
        if self.header is None:
            if part != "header":
                raise InvalidInput("the first message of an upload must be its header", reason="MISSING",
                                   field="header")  # fmt: skip
            self._start(message.header)
        elif part == "chunk":
            self._chunk(message.chunk)
        else:
            raise InvalidInput("an upload has one header, in its first message; later messages carry chunks",
                               reason="REPEATED_HEADER" if part == "header" else "MISSING", field="chunk")  # fmt: skip

    def _start(self, header: pb.UploadHeader) -> None:
        self.media_type = _media_type(header, self.limits)
        if header.size_bytes < 1:
            raise InvalidInput(f"header.size_bytes must be >= 1, got {header.size_bytes}", reason="OUT_OF_RANGE",
                               field="header.size_bytes")  # fmt: skip
        if header.size_bytes > self.limits.max_bytes:
            raise ResourceExhausted(
                f"the upload is {header.size_bytes} bytes, over this server's limit of {self.limits.max_bytes} bytes "
                "(KINEMA_UPLOAD_MAX_BYTES)",
                reason="ARTIFACT_TOO_LARGE",
                field="header.size_bytes",
                metadata={"max_bytes": str(self.limits.max_bytes)},
            )
        if header.sha256:
            check_sha256(header.sha256, "header.sha256")
        if len(header.filename) > MAX_FILENAME:
            raise InvalidInput(f"header.filename is {len(header.filename)} characters, at most {MAX_FILENAME}",
                               reason="OUT_OF_RANGE", field="header.filename")  # fmt: skip
        self.header = header

    def _chunk(self, chunk: bytes) -> None:
        assert self.header is not None
        if len(chunk) > MAX_CHUNK:
            raise InvalidInput(f"a chunk is {len(chunk)} bytes, at most {MAX_CHUNK}", reason="CHUNK_TOO_LARGE",
                               field="chunk")  # fmt: skip
        self.received += len(chunk)
        if self.received > self.header.size_bytes:
            raise InvalidInput(f"more bytes came than header.size_bytes = {self.header.size_bytes}",
                               reason="SIZE_MISMATCH", field="header.size_bytes")  # fmt: skip
        self._digest.update(chunk)
        self._file.write(chunk)

    def finish(self) -> tuple[BinaryIO, str]:
        """The received bytes (rewound) and their sha256, once the count and hash match the header."""
        if self.header is None:
            raise InvalidInput("an upload needs a header first, then its bytes", reason="MISSING", field="header")
        if self.received != self.header.size_bytes:
            raise InvalidInput(f"{self.received} bytes came, header.size_bytes said {self.header.size_bytes}",
                               reason="SIZE_MISMATCH", field="header.size_bytes")  # fmt: skip
        sha256 = self._digest.hexdigest()
        if self.header.sha256 and sha256 != self.header.sha256:
            raise InvalidInput(f"the bytes hash to {sha256}, not header.sha256 = {self.header.sha256}; nothing stored",
                               reason="SHA256_MISMATCH", field="header.sha256")  # fmt: skip
        self._file.seek(0)
        return self._file, sha256

    def store(self, store: ArtifactStore, tenant: str) -> Artifact:
        """Check what the bytes are and store them in `tenant` (bytes it already holds are not stored again)."""
        data, _ = self.finish()
        probe(data, self.media_type, "chunk", self.limits.media)  # InvalidInput: not a whole image/video in limits
        data.seek(0)
        assert self.header is not None
        parameters = {"filename": self.header.filename} if self.header.filename else {}
        return store.put(data, self.media_type, Provenance(pipeline=UPLOAD_PIPELINE, parameters=parameters), tenant)


__all__ = ["MAX_CHUNK", "UPLOAD_PIPELINE", "Upload", "UploadLimits", "accepted_media_types"]
