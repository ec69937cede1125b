"""A run's input artifacts (`PipelineRequest.inputs`): looked up in the caller's tenant before the run, read and
decoded by the pipeline that needs them.

`resolve_inputs` is what Generate, SubmitJob and the job worker call for every pipeline: each named input must be
an artifact of the caller's tenant (else NOT_FOUND, reason ARTIFACT_NOT_FOUND, field `inputs.<name>`, the answer
another tenant's artifact gets too, so hashes reveal nothing across tenants) of a media type the pipeline reads
for that input (else INVALID_ARGUMENT). Which names a pipeline takes, and which it requires, its `prepare` checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from kinema.errors import InvalidInput, NotFound
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.storage.artifacts import Artifact, ArtifactStore, check_sha256
from kinema.storage.media import DEFAULT_LIMITS, MediaLimits, decode_image, image_size


@dataclass(frozen=True)
class StoredInputs:
    """The input artifacts of one run, found in `tenant`'s part of `store`."""

    store: ArtifactStore | None = None
    tenant: str = ""
    artifacts: Mapping[str, Artifact] = field(default_factory=dict)
    limits: MediaLimits = DEFAULT_LIMITS
    _read: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)  # bytes read once per run

    def artifact(self, name: str) -> Artifact:
        try:
            return self.artifacts[name]
        except KeyError:
            raise InvalidInput(f"inputs.{name} is required", reason="MISSING", field=f"inputs.{name}") from None

    def read(self, name: str) -> bytes:
        """The input's bytes, checked against its sha256 (DataLoss when the store's copy no longer matches); read
        from the store once, kept for the rest of the run."""
        artifact = self.artifact(name)
        if name not in self._read:
            assert self.store is not None  # artifacts come from a store
            try:
                self._read[name] = self.store.get(artifact.sha256, self.tenant)
            except NotFound as e:  # removed since the run was checked
                raise NotFound(str(e), reason="ARTIFACT_NOT_FOUND", field=f"inputs.{name}") from None
        return self._read[name]

    def image_size(self, name: str) -> tuple[int, int]:
        """(width, height) from the image's header; the pixels are not decoded."""
        return image_size(self.read(name), self.artifact(name).media_type, f"inputs.{name}", self.limits)

    def image(self, name: str, mode: str = "RGB") -> np.ndarray:
        """The decoded image: (H, W, 3) uint8 for "RGB", (H, W) uint8 for "L"."""
        return decode_image(self.read(name), self.artifact(name).media_type, f"inputs.{name}", self.limits, mode)

    @property
    def parents(self) -> tuple[str, ...]:
        """The inputs' sha256, by input name: what a made artifact's provenance records as its parents."""
        return tuple(self.artifacts[n].sha256 for n in sorted(self.artifacts))


NO_INPUTS = StoredInputs()


def resolve_inputs(
    store: ArtifactStore,
    tenant: str,
    request: pb.PipelineRequest,
    info: pb.PipelineInfo,
    limits: MediaLimits = DEFAULT_LIMITS,
) -> StoredInputs:
    """The request's inputs as artifacts of `tenant`; NotFound / InvalidInput naming `inputs.<name>`."""
    accepted = {i.name: list(i.media_types) for i in info.inputs}
    found: dict[str, Artifact] = {}
    for name in sorted(request.inputs):
        where = f"inputs.{name}"
        if name not in accepted:  # prepare rejects these first; kept so no unchecked input ever runs
            raise InvalidInput(f"pipeline {info.name!r} reads no input {name!r}", reason="UNUSED_INPUT", field=where)
        sha256 = check_sha256(request.inputs[name].sha256, f"{where}.sha256")
        try:
            artifact = store.stat(sha256, tenant)
        except NotFound:
            raise NotFound(f"{where}: no artifact {sha256} in this tenant; upload it first (UploadArtifact)",
                           reason="ARTIFACT_NOT_FOUND", field=where) from None  # fmt: skip
        media_type = artifact.media_type.split(";")[0].strip().lower()
        if media_type not in accepted[name]:
            raise InvalidInput(f"{where} is {artifact.media_type}; pipeline {info.name!r} reads {accepted[name]} there",
                               reason="UNSUPPORTED_MEDIA_TYPE", field=where)  # fmt: skip
        found[name] = artifact
    return StoredInputs(store, tenant, found, limits)


__all__ = ["NO_INPUTS", "StoredInputs", "resolve_inputs"]
