"""Made outputs into stored artifacts and their wire form: one code path for Generate and for jobs.

`store_output` puts one `PipelineOutput` into the artifact store with its provenance and answers the `Output`
message without a download URL; `signed` adds a freshly presigned URL, as every response carrying an output does
(a job's outputs are stored in its record unsigned and signed again on every GetJob, WatchJob and ListJobs).
`store_signed` does both for an output answered as soon as it is stored (Generate).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from kinema.common.v1 import common_pb2
from kinema.orchestration.pipelines import PipelineOutput
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.storage.artifacts import Artifact, ArtifactStore, Provenance


def provenance_message(p: Provenance) -> pb.Provenance:
    """The wire form of a stored provenance; model names and versions come from the resolved `models` parameter."""
    msg = pb.Provenance(pipeline=p.pipeline, parent_sha256=list(p.parents))
    msg.parameters.update(dict(p.parameters))
    if p.seed is not None:
        msg.seed = p.seed
    refs = p.parameters.get("models") or {}
    for cap, sha in p.models.items():
        ref = refs.get(cap) or {}
        msg.models[cap].CopyFrom(common_pb2.ModelInfo(name=ref.get("name", ""), version=ref.get("version", ""),
                                                      sha256=sha))  # fmt: skip
    msg.created_at.FromDatetime(datetime.fromisoformat(p.created_utc).astimezone(UTC))
    return msg


def artifact_ref(a: Artifact) -> common_pb2.ArtifactRef:
    return common_pb2.ArtifactRef(uri=a.uri, sha256=a.sha256, media_type=a.media_type, size_bytes=a.size_bytes)


def store_output(store: ArtifactStore, made: PipelineOutput, pipeline: str, tenant: str) -> pb.Output:
    """Store `made` (bytes a tenant already holds are not written again) and describe it, unsigned."""
    return _store(store, made, pipeline, tenant)[0]


def store_signed(store: ArtifactStore, made: PipelineOutput, pipeline: str, tenant: str, ttl_seconds: int) -> pb.Output:
    """`store_output` with a presigned URL valid for `ttl_seconds`, signed without asking the store again whether
    the artifact it has just written exists."""
    output, artifact = _store(store, made, pipeline, tenant)
    return _with_url(output, lambda expires: store.sign(artifact, expires), ttl_seconds)


def _store(store: ArtifactStore, made: PipelineOutput, pipeline: str, tenant: str) -> tuple[pb.Output, Artifact]:
    provenance = Provenance(pipeline=pipeline, parameters=made.parameters, seed=made.seed, models=made.models,
                            parents=made.parents)  # fmt: skip
    artifact = store.put(made.data, made.media_type, provenance, tenant)
    output = pb.Output(index=made.index, artifact=artifact_ref(artifact), prompt_truncated=made.prompt_truncated)
    if made.seed is not None:
        output.seed = made.seed
    if artifact.provenance is not None:  # bytes stored before keep their first provenance
        output.provenance.CopyFrom(provenance_message(artifact.provenance))
    return output, artifact


def signed(store: ArtifactStore, output: pb.Output, tenant: str, ttl_seconds: int) -> pb.Output:
    """A copy of `output` with a presigned URL valid for `ttl_seconds` and its expiry time (NotFound when the artifact
    is gone from the store)."""
    return _with_url(output, lambda expires: store.presigned_url(output.artifact.sha256, tenant, expires), ttl_seconds)


def _with_url(output: pb.Output, presign: Callable[[timedelta], str], ttl_seconds: int) -> pb.Output:
    expires_at = datetime.now(UTC) + timedelta(seconds=ttl_seconds)
    url = presign(timedelta(seconds=ttl_seconds))
    result = pb.Output()
    result.CopyFrom(output)
    result.presigned_url = url
    result.expires_at.FromDatetime(expires_at)
    return result


__all__ = ["artifact_ref", "provenance_message", "signed", "store_output", "store_signed"]
