"""The one interface services call a network through, with its two implementations.

`TritonRunner` sends KServe v2 inference requests to Triton over gRPC (the default in the stack);
`LocalRunner` builds the same `kinema.inference.networks` classes in this process from the same
`config.pbtxt` (embedded mode, development, tests). Both raise only Kinema's typed errors.

`before_next_wait` hands a runner's next call on this thread a little work to do once its request is ready to
go: a sampling service's progress message, which then travels while the network runs instead of competing with
the loop for the interpreter between two steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from kinema.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from kinema.inference.allocator import retain_freed_memory
from kinema.inference.model_config import latest_version, parameters, read_config
from kinema.inference.networks import Network, load_network, run_batch

if TYPE_CHECKING:
    import grpc


@dataclass(frozen=True)
class ServedModel:
    """What actually ran: recorded in every response for provenance."""

    name: str
    version: str
    sha256: str
    params_json: str = ""
    # The config's `parameters` (what Triton passes to model.py), e.g. a distilled student's `student_steps`.
    parameters: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


class ModelObserver(Protocol):
    """Times each network call (`kinema.rpc.metrics.ServerMetrics` in services)."""

    def time_model(self, model: str, backend: str) -> AbstractContextManager[None]: ...


class ModelRunner(Protocol):
    backend: str

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], version: str = "", timeout: float | None = None
    ) -> dict[str, np.ndarray]: ...

    def describe(self, model: str, version: str = "") -> ServedModel: ...

    def models(self) -> list[str]: ...

    def close(self) -> None: ...


class _Pending(threading.local):
    def __init__(self) -> None:
        self.work: list[Callable[[], None]] = []


_pending = _Pending()


def before_next_wait(work: Callable[[], None]) -> None:
    """Run `work` on this thread just before its next model call starts waiting for the network.

    For work that should not delay the caller's next call but has to happen about now: a sampling loop's
    progress message, whose delivery wakes the service's event loop. Woken between two steps, the event loop
    held the interpreter while the sampling thread built its next request (0.3 ms a step here, measured in the
    denoiser service); woken just before the call waits, it runs while the network computes. Work runs in the
    order given; `run_pending` runs what no call picked up (a loop's last step). `work` must not raise.
    """
    _pending.work.append(work)


def run_pending() -> None:
    """Run (and forget) the work `before_next_wait` left on this thread."""
    work, _pending.work = _pending.work, []
    for fn in work:
        fn()


def _check_name(model: str) -> None:
    if not model or "/" in model or model.startswith("."):
        raise InvalidInput(f"invalid model name {model!r}")


class LocalRunner:
    """Networks built in this process from a Triton model repository folder, loaded on first use; the process keeps
    the memory their passes free (`kinema.inference.allocator`)."""

    backend = "local"

    def __init__(self, models: Path, observer: ModelObserver | None = None) -> None:
        retain_freed_memory()
        self.models_dir = Path(models)
        self.observer = observer
        self._loaded: dict[tuple[str, str], Network] = {}
        self._parameters: dict[tuple[str, str], dict[str, str]] = {}
        self._lock = threading.Lock()

    def _network(self, model: str, version: str) -> tuple[Network, str]:
        _check_name(model)
        model_dir = self.models_dir / model
        if not (model_dir / "config.pbtxt").is_file():
            raise NotFound(f"model {model!r} is not in the repository {self.models_dir}; known: {self.models()}")
        version = version or latest_version(model_dir)
        if not version.isdigit() or not (model_dir / version).is_dir():
            raise NotFound(f"model {model!r} has no version {version!r}")
        key = (model, version)
        with self._lock:
            if key not in self._loaded:
                params = parameters(read_config(model_dir))
                self._loaded[key] = load_network(params.get("network", model), model_dir / version, params)
                self._parameters[key] = params
            return self._loaded[key], version

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], version: str = "", timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        network, _ = self._network(model, version)
        run_pending()  # in process the network holds the interpreter anyway: no better moment comes
        with self.observer.time_model(model, self.backend) if self.observer else nullcontext():
            (result,) = run_batch(network, [inputs])
            if isinstance(result, Exception):
                raise result
        return result

    def describe(self, model: str, version: str = "") -> ServedModel:
        network, version = self._network(model, version)
        params = self._parameters[(model, version)]
        return ServedModel(model, version, network.sha256, network.params_json, parameters=params)

    def models(self) -> list[str]:
        return sorted(p.parent.name for p in self.models_dir.glob("*/config.pbtxt"))

    def close(self) -> None:
        self._loaded.clear()
        self._parameters.clear()


# gRPC's reconnect backoff grows towards 120 s by default: after Triton (or a service) restarts, a channel kept
# answering "unreachable" for 26 s past the server's return (bench/faults.py), longer than a job's retry budget.
# Capped at 2 s, a channel notices a returned server within about 2 s.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"  # KServe v2's gRPC inference call


def _wire(name: str, array: np.ndarray) -> tuple[str, bytes]:
    """(KServe v2 datatype, raw contents) of an input: strings length-prefixed as Triton's BYTES, the rest as is."""
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

    if array.dtype == object or array.dtype.kind in "SU":
        serialized = serialize_byte_tensor(np.asarray(array, dtype=object))  # one object: the bytes
        return "BYTES", serialized.item() if serialized.size else b""
    dtype = np_to_triton_dtype(array.dtype)
    if dtype is None:
        raise InvalidInput(f"input {name}: dtype {array.dtype} has no KServe v2 datatype")
    return dtype, np.ascontiguousarray(array).tobytes()


def _array(datatype: str, shape, raw: bytes) -> np.ndarray:
    """An output's raw contents as numpy (read-only, sharing the response's buffer)."""
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    flat = deserialize_bytes_tensor(raw) if datatype == "BYTES" else np.frombuffer(raw, triton_to_np_dtype(datatype))
    return flat.reshape(tuple(shape))


class TritonRunner:
    """KServe v2 over gRPC to a Triton server; errors come back as Kinema's typed errors.

    Inference goes out as tritonclient's own `ModelInferRequest`, serialized before the call so that the work
    `before_next_wait` leaves runs with the request ready and nothing else to do but wait; tritonclient's
    `InferenceServerClient.infer` builds the same message with more Python around it per call (0.2-0.3 ms here).
    Everything else (configs, readiness, loading) goes through `InferenceServerClient`.
    """

    backend = "triton"

    def __init__(
        self,
        url: str,
        observer: ModelObserver | None = None,
        timeout: float = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`credentials`: TLS to a Triton started with --grpc-use-ssl(-mutual) (`kinema.rpc.tls.internal_credentials`);
        None: plaintext."""
        import grpc
        import tritonclient.grpc as grpcclient
        from tritonclient.grpc import service_pb2

        self.url = url
        self.observer = observer
        self.timeout = timeout
        keepalive = grpcclient.KeepAliveOptions()  # tritonclient's own defaults, which channel_args replaces
        options = [
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            *RECONNECT_OPTIONS,
        ]
        self._client = grpcclient.InferenceServerClient(url, channel_args=options, creds=credentials)
        self._channel = (grpc.secure_channel(url, credentials, options) if credentials is not None
                         else grpc.insecure_channel(url, options))  # fmt: skip
        # Requests arrive serialized (`infer`); responses parse as tritonclient's message.
        self._model_infer = self._channel.unary_unary(
            INFER_METHOD, request_serializer=None, response_deserializer=service_pb2.ModelInferResponse.FromString
        )
        self._described: dict[tuple[str, str], ServedModel] = {}

    def _error(self, model: str, e: Exception) -> Exception:
        """Map a tritonclient exception to a Kinema error, keeping Triton's message for people."""
        status = str(getattr(e, "status", lambda: "")() or "")
        text = str(getattr(e, "message", lambda: str(e))() or e)
        if "INVALID_ARGUMENT:" in text:
            return InvalidInput(text.split("INVALID_ARGUMENT:", 1)[1].strip())
        if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in text:
            from kinema.errors import DeadlineExceeded

            return DeadlineExceeded(f"{model}: Triton did not answer in time")
        if "UNAVAILABLE" in status or "failed to connect" in text.lower() or "connection" in text.lower():
            return Unavailable(f"Triton at {self.url} is unreachable ({text.splitlines()[0][:200]})")
        if "unknown model" in text or "NOT_FOUND" in status or "is not found" in text:
            return NotFound(f"model {model!r} is not served here; ListModels names the models that are")  # no address
        if "not ready" in text:
            return Unavailable(f"model {model!r} is not ready in Triton at {self.url}")
        if "INVALID_ARG" in status or "unexpected shape" in text or "unexpected datatype" in text:
            return InvalidInput(f"{model}: {text}")
        return Unavailable(f"{model}: Triton failed ({text.splitlines()[0][:200] if text else status})")

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], version: str = "", timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        import grpc
        from tritonclient.grpc import service_pb2
        from tritonclient.utils import InferenceServerException

        _check_name(model)
        request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
        for name, array in inputs.items():
            datatype, raw = _wire(name, array)
            request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            request.raw_input_contents.append(raw)
        message = request.SerializeToString()
        run_pending()
        with self.observer.time_model(model, self.backend) if self.observer else nullcontext():
            try:
                response = self._model_infer(message, timeout=timeout or self.timeout)
            except grpc.RpcError as e:  # as tritonclient reports it, so that `_error` reads one kind of exception
                error = InferenceServerException(msg=e.details(), status=str(e.code()))
                raise self._error(model, error) from None
        outputs = zip(response.outputs, response.raw_output_contents, strict=True)
        return {o.name: _array(o.datatype, o.shape, raw) for o, raw in outputs}

    def describe(self, model: str, version: str = "") -> ServedModel:
        from tritonclient.utils import InferenceServerException

        _check_name(model)
        key = (model, version)
        if key not in self._described:
            try:
                config = self._client.get_model_config(model, version, as_json=True)["config"]
                ready = self._client.is_model_ready(model, version)
                versions = self._client.get_model_metadata(model, version, as_json=True).get("versions", [])
            except InferenceServerException as e:
                raise self._error(model, e) from None
            if not ready:
                raise NotFound(f"model {model!r} version {version or 'latest'} is not ready in Triton at {self.url}")
            params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
            served_version = version or max(versions, key=int, default="")
            sha, published = params.get("weights_sha256", ""), params.get("params_json", "")
            self._described[key] = ServedModel(model, served_version, sha, published, parameters=params)
        return self._described[key]

    def load(self, model: str, config_json: str, files: Mapping[str, bytes], timeout: float | None = None) -> None:
        """Load (or reload) `model` from a JSON ModelConfig and its files, keyed "file:<path in the model folder>"
        (e.g. "file:1/model.py"): Triton's override load, which needs --model-control-mode=explicit. Returns once the
        model is ready. `Unavailable` while Triton is unreachable; `FailedPrecondition` when it refuses the model."""
        from tritonclient.utils import InferenceServerException

        _check_name(model)
        try:
            timeout = timeout or self.timeout
            self._client.load_model(model, config=config_json, files=dict(files), client_timeout=timeout)
        except InferenceServerException as e:
            error = self._error(model, e)
            if isinstance(error, Unavailable) and "unreachable" not in str(error):
                text = str(e.message() or e)
                raise FailedPrecondition(f"Triton at {self.url} did not load {model!r}: {text.splitlines()[0][:300]}",
                                         reason="MODEL_LOAD_FAILED") from None  # fmt: skip
            raise error from None
        finally:  # the name may have served other weights before: describe it afresh
            self._described = {k: v for k, v in self._described.items() if k[0] != model}

    def ready(self, model: str, version: str = "") -> bool:
        """Whether Triton serves `model` now (asked every time: a restart forgets models loaded with their files)."""
        from tritonclient.utils import InferenceServerException

        _check_name(model)
        try:
            return self._client.is_model_ready(model, version)
        except InferenceServerException as e:
            raise self._error(model, e) from None

    def models(self) -> list[str]:
        from tritonclient.utils import InferenceServerException

        try:
            index = self._client.get_model_repository_index(as_json=True).get("models", [])
        except InferenceServerException as e:
            raise self._error("", e) from None
        return sorted({m["name"] for m in index if m.get("state") == "READY"})

    def close(self) -> None:
        self._channel.close()
        self._client.close()


def make_runner(
    backend: str,
    *,
    models: Path,
    triton_url: str,
    observer: ModelObserver | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> ModelRunner:
    """The runner a service's settings choose; `credentials`: TLS to Triton (TritonRunner)."""
    if backend == "local":
        return LocalRunner(models, observer)
    if backend == "triton":
        return TritonRunner(triton_url, observer, credentials=credentials)
    raise ValueError(f"backend must be 'triton' or 'local', got {backend!r}")
