"""A denoiser's whole sampling loop run inside Triton, next to its network: the `<denoiser>-loop` models.

Served one step per call, a 28-step Sample crosses processes 28 times (denoiser service -> Triton -> python-backend
stub and back): about 3 ms a step in calls and copies for the mini MMDiT on the reference CPU, and forward passes
slower than the same forward run in one process (docs/serving.md, "The loop next to the network"). A loop model
holds the same weights as its denoiser and runs the library's loop (`kinema.rpc.denoising.SampleCall` over
`kinema.pipelines.local.LocalDenoiser`) in its stub: one request per Sample, carrying the SampleRequest as the
denoiser service checked it, answered by one response per step (the Progress message) and a last one with the
result (decoupled). Loops of concurrent requests share each forward pass
(`kinema.inference.gang.Gang`), so they still batch as the per-step model's requests did in Triton's dynamic
batcher. A cancelled request (client gone, deadline) stops at its next step.

The denoiser service uses a loop model where the runner serves one whose weights hash equals the requested
denoiser's (`loop_model_name`); elsewhere the loop stays in the service, one `denoiser` call per step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from typing import Any

import numpy as np

from kinema.denoiser.v1 import denoiser_pb2 as pb
from kinema.errors import DeadlineExceeded, InvalidInput
from kinema.inference import triton_python
from kinema.inference.gang import Gang
from kinema.pipelines.local import LocalDenoiser
from kinema.rpc import tensors
from kinema.rpc.denoising import SampleCall

_LOGGER = logging.getLogger(__name__)

LOOP_SUFFIX = "-loop"
STEPS_METRIC = "kinema_loop_steps_total"


def loop_model_name(denoiser: str) -> str:
    """The Triton model that runs `denoiser`'s sampling loop (outside the `denoiser_<variant>` family's names)."""
    return denoiser + LOOP_SUFFIX


def is_loop_model(name: str) -> bool:
    return name.endswith(LOOP_SUFFIX)


class SampleStream:
    """The service's side: one SampleRequest run by a loop model, its SampleResponses as they come. `close()`
    (from any thread) cancels the request; Triton's loop stops at its next step."""

    def __init__(self, runner: Any, model: str, version: str, request: pb.SampleRequest, timeout: float) -> None:
        inputs = {
            "REQUEST": np.array([request.SerializeToString()], dtype=object),
            "TIMEOUT": np.array([timeout], dtype=np.float64),  # seconds the loop may take
        }
        self._call = runner.stream(model, inputs, version, timeout)

    def __iter__(self):
        for outputs in self._call:
            yield pb.SampleResponse.FromString(outputs["RESPONSE"].reshape(-1)[0])

    def close(self) -> None:
        self._call.cancel()


class _Stopped(Exception):
    pass


class _Request:
    """One request's response sender, and whether the server has cancelled it (client gone, deadline)."""

    def __init__(self, sender) -> None:
        self.sender = sender
        self.cancelled = threading.Event()


class SamplerModel:
    """The stub's side (`models/<denoiser>-loop/1/model.py`): each request's loop on a thread of its own; what the
    loops send goes through one outbox thread, so that no loop waits on the server between its steps."""

    def __init__(self, args: dict, pb_utils) -> None:
        self.pb = pb_utils
        self._cpus = os.sched_getaffinity(0)  # the stub's CPUs, before build pins this thread (and so the loops')
        self.network = triton_python.build("denoiser", args)  # pinned, threads set, weights checked
        self.gang = Gang(self.network.model)
        self.closing = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        # Every exchange with the server (sends, cancellation checks, the step counter) happens on the outbox thread,
        # or under this lock: a metric update concurrent with other loops' sends crashed the server (Triton 2.51 from
        # nvidia-pytriton 0.7.0, SIGSEGV in libtriton_python.so with 3+ loops in flight; none with the lock, 16 loops).
        self._ipc = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        try:
            family = pb_utils.MetricFamily(name=STEPS_METRIC, description="Sampling steps run by Triton's loop models",
                                           kind=pb_utils.MetricFamily.COUNTER)  # fmt: skip
            self._family = family  # kept alive as long as its metric
            self._steps = family.Metric(labels={"model": args.get("model_name", "")})
        except (AttributeError, TypeError, RuntimeError) as e:  # a server without custom metrics: serve without
            _LOGGER.warning("no %s metric: %s", STEPS_METRIC, e)
            self._steps = None
        self._sending = threading.Thread(target=self._send_all, name="loop-outbox", daemon=True)
        self._sending.start()

    def execute(self, requests: list) -> None:
        for request in requests:
            # Read here: a request's inputs are not to be touched once execute has returned (only its sender is).
            with self._ipc:
                target = _Request(request.get_response_sender())
            raw = self.pb.get_input_tensor_by_name(request, "REQUEST")
            timeout = self.pb.get_input_tensor_by_name(request, "TIMEOUT")
            inputs = (bytes(raw.as_numpy().reshape(-1)[0]) if raw is not None else None,
                      float(timeout.as_numpy().reshape(-1)[0]) if timeout is not None else None)  # fmt: skip
            thread = threading.Thread(target=self._serve, args=(target, *inputs), name="sample-loop", daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()
        return None  # decoupled: each loop answers through its request's response sender

    def finalize(self) -> None:
        self.closing.set()  # every loop stops at its next step
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=30)
        self._outbox.put(None)
        self._sending.join(timeout=30)

    def _send_all(self) -> None:
        """The outbox: each message in the order the loops made them; after a step's message, whether the server
        has cancelled that request (its loop then stops at its next step)."""
        with contextlib.suppress(OSError):  # off the loops' core: sending competed with their forward passes
            os.sched_setaffinity(0, self._cpus)
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        while (item := self._outbox.get()) is not None:
            target, message, error = item
            try:
                with self._ipc:
                    if error is not None:
                        target.sender.send(self._error(*error), flags=final)
                    elif message is None:  # stopped: no result
                        target.sender.send(flags=final)
                    elif message.HasField("result"):
                        target.sender.send(self._response(message), flags=final)
                    else:
                        target.sender.send(self._response(message))
                        if self._steps is not None:
                            self._steps.increment(1)
                        if target.sender.is_cancelled():
                            target.cancelled.set()
            except Exception:
                _LOGGER.exception("sending a loop's response failed")
                target.cancelled.set()

    def _response(self, message: pb.SampleResponse):
        data = np.array([message.SerializeToString()], dtype=np.object_)
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor("RESPONSE", data)])

    def _error(self, message: str, code: str):
        try:
            error = self.pb.TritonError(message, getattr(self.pb.TritonError, code))
        except (AttributeError, TypeError):  # backends before error codes
            error = self.pb.TritonError(message)
        return self.pb.InferenceResponse(output_tensors=[], error=error)

    def _check(self, call: SampleCall) -> None:
        """What the per-step model checks on every call (`Network.validate`: shapes against the network, finite
        values), once before the loop: the loop's calls then hold the same shapes and values the loop made."""
        for text in (call.cond, call.uncond):
            rows = text.tokens.shape[0]
            x = call.noise[:rows].numpy()
            self.network.validate({"X": x, "T": np.zeros((rows, 1), np.float32), "CONTEXT": text.tokens.numpy(),
                                   "CONTEXT_MASK": text.mask.numpy(), "POOLED": text.pooled.numpy()})  # fmt: skip

    def _serve(self, target: _Request, raw: bytes | None, timeout: float | None) -> None:
        def send(message: pb.SampleResponse | None = None, error: tuple[str, str] | None = None) -> None:
            self._outbox.put((target, message, error))

        try:
            if raw is None or timeout is None or not timeout > 0:
                raise InvalidInput("a loop request needs REQUEST (a serialized SampleRequest) and TIMEOUT (> 0 s)")
            deadline = time.monotonic() + timeout
            call = SampleCall.parse(pb.SampleRequest.FromString(raw))
            self._check(call)
            denoiser = LocalDenoiser(self.gang, self.network.sha256, latent_channels=call.noise.shape[1])
            progress = call.progress()

            def step(i: int, n: int, x) -> None:
                if target.cancelled.is_set() or self.closing.is_set():
                    raise _Stopped
                send(progress(i, n, x))
                if i + 1 < n and time.monotonic() > deadline:
                    raise DeadlineExceeded("the request's deadline passed during sampling")

            with self.gang.member():
                latents = call.sample(denoiser, step)
            send(pb.SampleResponse(result=pb.SampleResult(latents=tensors.encode(latents))))
        except _Stopped:
            send()
        except InvalidInput as e:
            send(error=(f"INVALID_ARGUMENT: {e}", "INVALID_ARG"))
        except DeadlineExceeded as e:
            send(error=(f"DEADLINE_EXCEEDED: {e}", "UNAVAILABLE"))
        except Exception as e:
            _LOGGER.exception("sampling loop failed")
            send(error=(f"INTERNAL: sampling loop failed ({type(e).__name__})", "INTERNAL"))
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())


# The model.py of every loop model (models/denoiser-loop/1/model.py): Triton needs one per model folder.
MODEL_PY = '''"""Triton python-backend model: a denoiser's sampling loop next to its network (decoupled).

initialize / execute / finalize only; the loop and its glue live once in the library
(kinema.inference.triton_sampler), shared with the denoiser service.
"""

import triton_python_backend_utils as pb_utils

from kinema.inference import triton_sampler


class TritonPythonModel:
    def initialize(self, args):
        self.model = triton_sampler.SamplerModel(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
'''
