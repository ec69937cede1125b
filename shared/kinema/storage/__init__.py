"""Artifact storage: content-addressed media with provenance, in S3 (MinIO) or a local folder.

`kinema.storage.artifacts` holds the `ArtifactStore` interface and its two implementations;
`kinema.storage.s3server` starts a real S3 server (SeaweedFS) for tests and a one-machine stack.
"""
