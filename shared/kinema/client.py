"""Python client of the orchestrator (`kinema.orchestrator.v1`): generate, jobs, artifacts and verified downloads.

    with KinemaClient("127.0.0.1:50050", tenant="acme") as kinema:
        result = kinema.generate("a red cube", steps=8, on_progress=lambda p: print(p.step, p.total))
        kinema.download(result.outputs[0], "cube.png")  # sha256 checked, written whole or not at all

Requests and replies are the proto messages of orchestrator.proto (the public contract). A failed call raises the
domain error its status stands for (`kinema.rpc.status.from_rpc_error`: `InvalidInput`, `NotFound`, `Unavailable`,
...), with the server's message, its `ErrorDetail` (reason, field) and `metadata["grpc_code"]`; never a raw
`grpc.RpcError`. A server that cannot be reached is `Unavailable` with reason SERVER_UNREACHABLE, naming the address.
A busy server refuses with `ResourceExhausted` (reason SERVER_BUSY for Generate, JOB_QUEUE_FULL for submit_job) whose
`retry_after` holds its hint in seconds: wait at least that long, plus some jitter, and call again.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from kinema.common.v1 import common_pb2
from kinema.errors import DataLoss, DeadlineExceeded, InvalidInput, KinemaError, NotFound, Unavailable
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from kinema.rpc.status import from_rpc_error
from kinema.storage.media import media_type_of

# The request metadata the orchestrator reads the tenant from. Deliberately the same literal as
# kinema.rpc.auth.TENANT_KEY (which the servers' `tenant_of` reads); a test keeps them equal.
TENANT_KEY = "kinema-tenant"
UNARY_TIMEOUT_SECONDS = 60.0  # unary calls when the client has no timeout: a hung server never blocks forever
DOWNLOAD_TIMEOUT_SECONDS = 60.0  # per socket operation of a download
TERMINAL = frozenset({pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})
URL_SCHEMES = ("http", "https", "file")  # presigned S3 URLs, and file:// where the server stores in a local folder
_CHUNK = 1 << 20
_REACH_SECONDS = 1.0  # how long an UNAVAILABLE call's channel gets to prove the server is there

# What `download` and `read` take: an output or GetArtifact reply (URL included), an ArtifactRef or a sha256.
Downloadable = pb.Output | pb.GetArtifactResponse | common_pb2.ArtifactRef | str


def job_state(state: int | str) -> int:
    """A `JobState` from its number or name, with or without the prefix and in any case ("completed")."""
    if isinstance(state, int):
        if state not in pb.JobState.values():
            raise InvalidInput(f"{state} is not a JobState", reason="OUT_OF_RANGE", field="state")
        return state
    name = state.strip().upper()
    name = name if name.startswith("JOB_STATE_") else f"JOB_STATE_{name}"
    try:
        return pb.JobState.Value(name)
    except ValueError:
        names = [n.removeprefix("JOB_STATE_").lower() for n in pb.JobState.keys()[1:]]
        raise InvalidInput(
            f"unknown job state {state!r}; one of {names}", reason="OUT_OF_RANGE", field="state"
        ) from None


def state_name(state: int) -> str:
    """The short name of a `JobState`: "completed" for JOB_STATE_COMPLETED."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def pipeline_request(
    prompt: str | Sequence[str],
    *,
    n: int = 1,
    pipeline: str = "text_to_image",
    seed: int | None = None,
    steps: int = 0,
    guidance: float | None = None,
    size: int = 0,
    width: int = 0,
    height: int = 0,
    sampler: str = "",
    shift: float = 0.0,
    negative_prompt: str = "",
    strength: float = 0.0,
    models: Mapping[str, str | common_pb2.ModelRef] | None = None,
    inputs: Mapping[str, str | common_pb2.ArtifactRef] | None = None,
    options: Mapping[str, Any] | None = None,
) -> pb.PipelineRequest:
    """A `PipelineRequest`; zero or None leaves a field to the pipeline's default, as the proto says.

    A single prompt is repeated `n` times (output i gets seed + i); `size` sets both width and height. `models`
    maps a capability to a model name or `ModelRef`, `inputs` a name to an artifact's sha256 or `ArtifactRef`
    (`upload` returns one), e.g. `pipeline="image_to_image", inputs={"image": ref}, strength=0.6`.
    The server checks everything: an out-of-range value comes back as `InvalidInput` naming the field.
    """
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    request = pb.PipelineRequest(pipeline=pipeline, prompts=prompts, steps=steps, width=width or size,
                                 height=height or size, sampler=sampler, shift=shift,
                                 negative_prompt=negative_prompt, strength=strength)  # fmt: skip
    if seed is not None:
        request.seed = seed
    if guidance is not None:
        request.guidance = guidance
    for cap, ref in (models or {}).items():
        request.models[cap].CopyFrom(common_pb2.ModelRef(name=ref) if isinstance(ref, str) else ref)
    for name, art in (inputs or {}).items():
        request.inputs[name].CopyFrom(common_pb2.ArtifactRef(sha256=art) if isinstance(art, str) else art)
    if options:
        request.options.update(dict(options))
    return request


class KinemaClient:
    """One channel to the orchestrator at `address` ("host:port"), acting for `tenant` (None: the server's default).

    `timeout` bounds each call in seconds. None: unary calls get 60 s, and the streams (`generate`, `watch_job`)
    are bounded only by the server's request timeout (300 s by default), which `watch_job` rides over by watching
    again. `credentials` makes a TLS channel (`kinema.rpc.tls.channel_credentials(ca_file, cert_file, key_file)`);
    `api_key` is sent as `authorization: Bearer <key>` to a server that checks keys (kinema.rpc.auth). Close it, or
    use it as a context manager.
    """

    def __init__(
        self,
        address: str,
        tenant: str | None = None,
        timeout: float | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        download_timeout: float = DOWNLOAD_TIMEOUT_SECONDS,
        api_key: str | None = None,
    ) -> None:
        self.address, self.tenant, self.timeout, self.download_timeout = address, tenant, timeout, download_timeout
        self.tls = credentials is not None
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=list(options))
        else:
            self._channel = grpc.secure_channel(address, credentials, options=list(options))
        self._stub = pb_grpc.OrchestratorStub(self._channel)
        self._metadata = ((TENANT_KEY, tenant),) if tenant else ()
        if api_key:
            self._metadata += (("authorization", f"Bearer {api_key}"),)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KinemaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running pipelines --------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[str] | pb.PipelineRequest,
        *,
        on_progress: Callable[[common_pb2.Progress], None] | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> pb.GenerateResult:
        """Run a pipeline while waiting; `on_progress` gets each `Progress` (step, total) of the stream.

        `prompt` is a ready `PipelineRequest`, or the prompt(s) with `fields` as `pipeline_request` takes them.
        Stopping early (an exception in `on_progress`, Ctrl-C) cancels the call: the server stops within one
        sampling step and stores nothing.
        """
        request = prompt if isinstance(prompt, pb.PipelineRequest) else pipeline_request(prompt, **fields)
        result = None
        events = self._stream(self._stub.Generate, pb.GenerateRequest(request=request), self._stream_timeout(timeout))
        for event in events:
            if event.HasField("progress"):
                if on_progress is not None:
                    on_progress(event.progress)
            elif event.HasField("result"):
                result = event.result
        if result is None:
            raise KinemaError(f"the server at {self.address} ended Generate without a result", reason="NO_RESULT")
        return result

    def submit_job(
        self,
        prompt: str | Sequence[str] | pb.PipelineRequest,
        *,
        idempotency_key: str = "",
        timeout: float | None = None,
        **fields: Any,
    ) -> pb.Job:
        """Queue a run as a durable job and return it (QUEUED, or the existing job of a reused idempotency key)."""
        request = prompt if isinstance(prompt, pb.PipelineRequest) else pipeline_request(prompt, **fields)
        submit = pb.SubmitJobRequest(request=request, idempotency_key=idempotency_key)
        return self._unary(self._stub.SubmitJob, submit, timeout).job

    def get_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        return self._unary(self._stub.GetJob, pb.GetJobRequest(id=job_id), timeout).job

    def watch_job(
        self, job_id: str, on_progress: Callable[[pb.Job], None] | None = None, *, timeout: float | None = None
    ) -> pb.Job:
        """Follow a job until it is COMPLETED, FAILED or CANCELLED and return that snapshot; `on_progress` gets
        every snapshot the server sends (the current one first). It returns a finished job as is, not raising for
        FAILED: `Job.error` says why. Ending the watch (timeout, Ctrl-C) never stops the job."""
        total = self._stream_timeout(timeout)
        deadline = None if total is None else time.monotonic() + total
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"job {job_id} did not finish within {total:g} s (it keeps running)",
                                       reason="CLIENT_TIMEOUT")  # fmt: skip
            last = None
            try:
                for event in self._stream(self._stub.WatchJob, pb.WatchJobRequest(id=job_id), remaining):
                    last = event.job
                    if on_progress is not None:
                        on_progress(last)
            except DeadlineExceeded as e:
                if e.reason != "SERVER_TIMEOUT":  # the server's own bound on a call without deadline: watch again
                    raise
                continue
            if last is None or last.state not in TERMINAL:
                raise KinemaError(f"the server at {self.address} ended WatchJob before job {job_id} finished",
                                  reason="WATCH_ENDED")  # fmt: skip
            return last

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        """Ask a job to stop; returns it (CANCELLED, or RUNNING with cancel_requested until its worker stops)."""
        return self._unary(self._stub.CancelJob, pb.CancelJobRequest(id=job_id), timeout).job

    def list_jobs(
        self, state: int | str | None = None, *, limit: int | None = 50, timeout: float | None = None
    ) -> list[pb.Job]:
        """The tenant's jobs, newest first, at most `limit` (None: all), only those in `state` if given."""
        want = pb.JOB_STATE_UNSPECIFIED if state is None else job_state(state)
        jobs: list[pb.Job] = []
        token = ""
        while limit is None or len(jobs) < limit:
            size = 1000 if limit is None else min(1000, limit - len(jobs))
            page = self._unary(self._stub.ListJobs, pb.ListJobsRequest(page_size=size, page_token=token, state=want),
                               timeout)  # fmt: skip
            jobs.extend(page.jobs)
            token = page.next_page_token
            if not token:
                break
        return jobs

    # -- artifacts and catalogues ---------------------------------------------------------------------

    def upload(
        self,
        source: str | os.PathLike[str] | bytes,
        *,
        media_type: str | None = None,
        filename: str | None = None,
        timeout: float | None = None,
    ) -> common_pb2.ArtifactRef:
        """Store a file (or bytes) as an artifact of the tenant and return its `ArtifactRef`, ready for `inputs`.

        `media_type` defaults to the file's suffix (.png, .jpg/.jpeg, .mp4, ...) or, for bytes, their signature;
        `filename` (recorded in the provenance) to the file's name. Bytes the tenant already holds are not sent
        again (GetArtifact first). The server checks the bytes (a whole image of an accepted size) and stores them
        whole or not at all: `InvalidInput` for what is not, `ResourceExhausted` over its size limit.
        """
        path = None if isinstance(source, bytes | bytearray) else Path(source)
        if path is not None:
            try:
                size, sha256 = _file_digest(path)
            except OSError as e:
                raise InvalidInput(f"cannot read {path}: {e.strerror or e}", reason="UNREADABLE_FILE") from None
            head = _read_head(path)
        else:
            data = bytes(source)
            size, sha256, head = len(data), hashlib.sha256(data).hexdigest(), data[:16]
        media_type = media_type or media_type_of(path.name if path is not None else None, head)
        try:
            return self.get_artifact(sha256, timeout=timeout).artifact
        except NotFound:
            pass
        name = filename if filename is not None else (path.name if path is not None else "")
        header = pb.UploadHeader(media_type=media_type, size_bytes=size, sha256=sha256, filename=name)

        def messages() -> Iterator[pb.UploadArtifactRequest]:
            yield pb.UploadArtifactRequest(header=header)
            if path is None:
                for start in range(0, size, _CHUNK):
                    yield pb.UploadArtifactRequest(chunk=data[start : start + _CHUNK])
                return
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    yield pb.UploadArtifactRequest(chunk=chunk)

        budget = timeout or self.timeout or UNARY_TIMEOUT_SECONDS + size / _CHUNK  # a second per MiB beyond a minute
        return self._unary(self._stub.UploadArtifact, messages(), budget).artifact

    def get_artifact(self, ref: str | common_pb2.ArtifactRef | pb.Output, *, url_ttl_seconds: int = 0,
                     timeout: float | None = None) -> pb.GetArtifactResponse:  # fmt: skip
        """An artifact's metadata, provenance and a fresh presigned URL (`url_ttl_seconds` 0: an hour)."""
        sha256 = _sha256_of(ref)
        request = pb.GetArtifactRequest(sha256=sha256, url_ttl_seconds=url_ttl_seconds)
        return self._unary(self._stub.GetArtifact, request, timeout)

    def download(self, artifact: Downloadable, path: str | os.PathLike[str]) -> Path:
        """Fetch an artifact to `path`, checking its size and sha256; the file appears whole or not at all.

        An output or GetArtifact reply is fetched from its presigned URL (a fresh one is asked for once that
        expired); a bare ArtifactRef or sha256 asks GetArtifact first. Bytes that do not match raise `DataLoss`
        (reason SHA256_MISMATCH) and leave `path` as it was.
        """
        url, expected, size = self._source(artifact)
        return download_url(url, Path(path), expected, size, timeout=self.download_timeout)

    def read(self, artifact: Downloadable) -> bytes:
        """An artifact's bytes, checked as `download` checks them."""
        url, expected, size = self._source(artifact)
        return read_url(url, expected, size, timeout=self.download_timeout)

    def list_models(self, capability: str = "", *, timeout: float | None = None) -> list[pb.CapabilityModels]:
        reply = self._unary(self._stub.ListModels, pb.ListModelsRequest(capability=capability), timeout)
        return list(reply.capabilities)

    def list_pipelines(self, name: str = "", *, timeout: float | None = None) -> list[pb.PipelineInfo]:
        return list(self._unary(self._stub.ListPipelines, pb.ListPipelinesRequest(name=name), timeout).pipelines)

    # -- plumbing -------------------------------------------------------------------------------------

    def _source(self, artifact: Downloadable) -> tuple[str, str, int]:
        """(URL, sha256, size) to fetch `artifact` from, asking GetArtifact when it carries no live URL."""
        if isinstance(artifact, pb.Output | pb.GetArtifactResponse) and artifact.presigned_url:
            expires = artifact.expires_at.ToDatetime(UTC) if artifact.HasField("expires_at") else None
            if expires is None or expires > datetime.now(UTC) + timedelta(seconds=30):
                return artifact.presigned_url, artifact.artifact.sha256, artifact.artifact.size_bytes
        reply = self.get_artifact(artifact if not isinstance(artifact, pb.GetArtifactResponse) else artifact.artifact)
        return reply.presigned_url, reply.artifact.sha256, reply.artifact.size_bytes

    def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        timeout = timeout or self.timeout or UNARY_TIMEOUT_SECONDS
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._error(err, timeout) from None

    def _stream_timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def _stream(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Iterator[Any]:
        """The responses of a server-streaming call; `timeout` is final here (None: no client deadline)."""
        call = method(request, timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise self._error(err, timeout) from None
        finally:
            call.cancel()  # a no-op once the stream ended; else the caller stopped early and the server stops too

    def _error(self, err: grpc.RpcError, timeout: float | None) -> KinemaError:
        """The domain error of a failed call, with a clearer message where gRPC's own says little."""
        error = from_rpc_error(err)
        code = error.metadata["grpc_code"]
        if code == "UNAVAILABLE" and not error.reason and not self._reachable():
            metadata = error.metadata | {"address": self.address}
            words = str(error).lower()  # gRPC's words for a CA, protocol or name mismatch
            if "handshake" in words or "verification check failed" in words:
                hint = ("; the TLS handshake failed: check the CA (--ca-cert), the name the server's certificate holds "
                        "(--tls-server-name), the client certificate (--client-cert)")  # fmt: skip
            elif not self.tls and "socket closed" in words:  # connected, then hung up on
                hint = "; a server that speaks TLS closes plaintext connections (--tls, KinemaClient(credentials=))"
            else:
                hint = ""
            return Unavailable(f"cannot reach the Kinema server at {self.address} ({error}){hint}",
                               reason="SERVER_UNREACHABLE", metadata=metadata)  # fmt: skip
        if code == "DEADLINE_EXCEEDED" and not error.reason and timeout is not None:  # the client's deadline passed
            return DeadlineExceeded(f"the call to the Kinema server at {self.address} did not end within {timeout:g} s",
                                    reason="CLIENT_TIMEOUT", metadata=error.metadata)  # fmt: skip
        return error

    def _reachable(self) -> bool:
        """Whether the channel connects: an UNAVAILABLE status from the server itself (a model service or the
        store down) comes over a working connection, one from gRPC's client side (nobody listening) does not."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=_REACH_SECONDS)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()


def _file_digest(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(16)


def _sha256_of(ref: str | common_pb2.ArtifactRef | pb.Output) -> str:
    if isinstance(ref, str):
        return ref
    return ref.artifact.sha256 if isinstance(ref, pb.Output) else ref.sha256


# -- verified downloads -----------------------------------------------------------------------------


def read_url(url: str, sha256: str, size: int = 0, *, timeout: float = DOWNLOAD_TIMEOUT_SECONDS) -> bytes:
    """The bytes at `url`, which must hash to `sha256` (and be `size` long when size > 0), else `DataLoss`."""
    chunks: list[bytes] = []
    _fetch(url, sha256, size, timeout, chunks.append)
    return b"".join(chunks)


def download_url(
    url: str, path: Path, sha256: str, size: int = 0, *, timeout: float = DOWNLOAD_TIMEOUT_SECONDS
) -> Path:
    """`read_url` streamed into `path`: written to a temporary file beside it, renamed once the hash matched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with tmp.open("xb") as f:
            _fetch(url, sha256, size, timeout, f.write)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fetch(url: str, sha256: str, size: int, timeout: float, sink: Callable[[bytes], object]) -> None:
    scheme = urlsplit(url).scheme
    if scheme not in URL_SCHEMES:
        raise InvalidInput(f"cannot download from a {scheme or 'relative'!s} URL; {URL_SCHEMES} only",
                           reason="UNSUPPORTED_URL")  # fmt: skip
    where = _redacted(url)
    digest, got = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                got += len(chunk)
                sink(chunk)
    except urllib.error.HTTPError as e:
        kind = NotFound if e.code == 404 else Unavailable
        raise kind(f"download of artifact {sha256} from {where} failed: HTTP {e.code} {e.reason}",
                   reason="DOWNLOAD_FAILED", metadata={"http_status": str(e.code)}) from None  # fmt: skip
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise Unavailable(f"download of artifact {sha256} from {where} failed: {reason}",
                          reason="DOWNLOAD_FAILED") from None  # fmt: skip
    if digest.hexdigest() != sha256 or (size and got != size):
        raise DataLoss(f"the bytes downloaded for artifact {sha256} from {where} do not match it "
                       f"({got} bytes hashing to {digest.hexdigest()}); nothing was written",
                       reason="SHA256_MISMATCH")  # fmt: skip


def _redacted(url: str) -> str:
    """`url` without its query: a presigned URL's signature is a credential and stays out of messages and logs."""
    parts = urlsplit(url)
    return parts._replace(query="", fragment="").geturl()


__all__ = [
    "DOWNLOAD_TIMEOUT_SECONDS",
    "TENANT_KEY",
    "TERMINAL",
    "Downloadable",
    "KinemaClient",
    "download_url",
    "job_state",
    "pipeline_request",
    "read_url",
    "state_name",
]
