"""Fuzzing the distill service over real gRPC (a sample; `bench/fuzz.py` sends thousands): every malformed request to
each of its RPCs, distillation jobs on (its own redis-server; no worker, so accepted distillations wait queued and
later starts for the same teacher answer ALREADY_EXISTS), gets OK or a defined status, never INTERNAL or UNKNOWN, and
the service stays healthy."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from google.protobuf.message import Message
from hypothesis import strategies as st

from kinema.distill.v1 import distill_pb2 as pb
from kinema.distill.v1 import distill_pb2_grpc as pb_grpc
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.rpc.process import ServiceProcess
from kinema.testing.fuzz import messages

from .test_fuzz import check_rpc

# (service, stub, method, request type), as tests/services/test_fuzz.py's RPCS; bench/fuzz.py sends these too.
RPCS = [
    ("distill", pb_grpc.DistillStub, "Sample", pb.SampleRequest),
    ("distill", pb_grpc.DistillStub, "ListModels", pb.ListModelsRequest),
    ("distill", pb_grpc.DistillStub, "StartDistillation", pb.StartDistillationRequest),
    ("distill", pb_grpc.DistillStub, "GetDistillation", pb.GetDistillationRequest),
    ("distill", pb_grpc.DistillStub, "CancelDistillation", pb.CancelDistillationRequest),
]


def _tensor(shape: tuple[int, ...], dtype: int = 1, fill: bytes = b"\0", size: int = 4) -> dict:
    """Field values of a kinema.common.v1.Tensor (dtype 1: float32, 7: bool) of `shape` filled with `fill`."""
    return {"dtype": dtype, "shape": list(shape), "data": fill * (math.prod(shape) * size)}


@st.composite
def _cond(draw: st.DrawFn) -> dict:
    """A Conditioning that fits the student's text widths (384) for B rows, or misses them by one (rows, width)."""
    b, length = draw(st.sampled_from([1, 1, 1, 2])), draw(st.sampled_from([1, 4]))
    width, pooled_rows = draw(st.sampled_from([384, 384, 384, 383])), draw(st.sampled_from([b, b, b, b + 1]))
    return {"tokens": _tensor((b, length, width)), "mask": _tensor((b, length), dtype=7, fill=b"\1", size=1),
            "pooled": _tensor((pooled_rows, 384))}  # fmt: skip


# Unsteered, few draws get past the first checks: Sample's noise and cond decode, StartDistillation's range checks of
# its six budget fields. Half of the draws of these RPCs are steered past them (`requests`), to the student's loop
# (steps, timesteps, seeds; latents of a shape the network may not take) and to the teacher look-up, the record, the
# claim and the queue. Field names apply at any depth: StartDistillation's "name" and "version" are its teacher's too.
_IN_RANGE = st.one_of(st.integers(-2, 9), st.sampled_from([0, 1, 2, 4, 8, 100_000, 100_001, 2**31 - 1, -(2**31)]))
_TIMES = st.sampled_from([1.0, 0.75, 0.5, 0.25, 0.0, -0.5, 1.5, float("nan")])
_SEEDS = st.sampled_from([0, 1, 7, 2**63, 2**64 - 1])
# (B, C, h, w): the first four fit the student (C = 4, h and w even, at most 64); each of the others misses one.
_NOISE = st.sampled_from([(1, 4, 8, 8), (2, 4, 8, 8), (1, 4, 16, 16), (1, 4, 2, 8), (1, 4, 7, 8), (1, 3, 8, 8),
                          (1, 4, 66, 66), (1, 4, 2, 130)]).map(_tensor)  # fmt: skip
_MAX_SECONDS = st.one_of(st.sampled_from([0.0, 1.0, 21600.0, 21600.5, -1.0, float("nan"), float("inf")]),
                         st.floats(0, 30_000))  # fmt: skip
_NAMES = st.one_of(st.sampled_from(["", "denoiser", "denoiser_4step", "denoiser_2step", "denoiser_fuzz", "denoiser_",
                                    "denoiser_../x", "text_encoder", "Denoiser_A"]), st.text(max_size=20))  # fmt: skip
_VERSIONS = st.one_of(st.sampled_from(["", "1", "0", "2", "01", "\u0663", "\u00b2", "9" * 30]), st.text(max_size=6))
STEERED = {
    "Sample": {
        "model": st.sampled_from([{}, {"name": "denoiser_2step"}, {"name": "denoiser_4step", "version": "1"}]),
        "noise": _NOISE,
        "cond": _cond(),
        "steps": st.one_of(st.sampled_from([0, 1, 2, 4]), st.integers(-1, 9)),
        "timesteps": st.one_of(st.just([]), st.lists(_TIMES, max_size=9), st.sampled_from([[1.0, 0.5], [0.75]])),
        "seed": _SEEDS,
        "seeds": st.one_of(st.just([]), st.lists(_SEEDS, max_size=3)),
    },
    "StartDistillation": {
        "student_steps": _IN_RANGE,
        "train_steps": _IN_RANGE,
        "teacher_samples": _IN_RANGE,
        "batch": _IN_RANGE,
        "eval_prompts": _IN_RANGE,
        "max_seconds": _MAX_SECONDS,
        "name": _NAMES,
        "version": _VERSIONS,
    },
}
# Steered draws of these RPCs carry these fields (unset, the first check ends the call, as in most unsteered draws).
SET = {"Sample": ("noise", "cond")}


def requests(method: str, request_type: type[Message]) -> st.SearchStrategy[Message]:
    """The requests fuzzing `method` sends: `messages(request_type)`, half of them steered where STEERED says."""
    if method not in STEERED:
        return messages(request_type)
    steered = messages(request_type, overrides=STEERED[method])
    return st.one_of(messages(request_type), steered.filter(lambda r: all(r.HasField(f) for f in SET.get(method, ()))))


@pytest.fixture(scope="module")
def fuzzed_distill(triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The distill service with distillation jobs on, over a redis-server of this module's own (nothing on disk), so
    the records and teacher claims the fuzzing leaves reach no other test module."""
    root = tmp_path_factory.mktemp("fuzz-distill")
    with RedisServer(RedisSettings(), log_path=root / "redis.log") as redis_server:
        env = {"KINEMA_BACKEND": "triton", "KINEMA_TRITON_URL": triton.grpc_url,
               "KINEMA_MAX_MESSAGE_BYTES": str(4 << 20), "KINEMA_REDIS_URL": redis_server.url}  # fmt: skip
        proc = ServiceProcess("distill", root, **env).start()
        try:
            yield proc
        finally:
            proc.stop()


@pytest.mark.slow
@pytest.mark.parametrize(("service", "stub_type", "method", "request_type"), RPCS,
                         ids=[f"{s}.{m}" for s, _, m, _ in RPCS])  # fmt: skip
def test_malformed_requests_get_a_defined_status_and_the_service_stays_up(
    fuzzed_distill, service, stub_type, method, request_type
) -> None:
    check_rpc(fuzzed_distill, stub_type, method, requests(method, request_type))
