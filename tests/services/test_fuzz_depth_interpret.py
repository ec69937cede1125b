"""Fuzzing the depth and interpret services over real gRPC (a sample; `bench/fuzz.py` sends thousands): every
malformed request to each of their RPCs, both served by the session's Triton (which loads depth, the iin_* models and
the vector_ae_encoder / _decoder they decode through: kinema.rpc.process.SERVED_MODELS), gets OK or a defined status,
never INTERNAL or UNKNOWN, and the service stays healthy."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from google.protobuf.message import Message
from hypothesis import strategies as st

from kinema.depth.v1 import depth_pb2, depth_pb2_grpc
from kinema.interpret.v1 import interpret_pb2 as pb
from kinema.interpret.v1 import interpret_pb2_grpc as pb_grpc
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.rpc.process import ServiceProcess
from kinema.testing.fuzz import messages

from ..conftest import triton_services
from .test_fuzz import check_rpc

# (service, stub, method, request type), as tests/services/test_fuzz.py's RPCS; bench/fuzz.py sends these too.
RPCS = [
    ("depth", depth_pb2_grpc.DepthStub, "Estimate", depth_pb2.EstimateRequest),
    ("depth", depth_pb2_grpc.DepthStub, "ListModels", depth_pb2.ListModelsRequest),
    ("interpret", pb_grpc.InterpretStub, "Factorize", pb.FactorizeRequest),
    ("interpret", pb_grpc.InterpretStub, "Compose", pb.ComposeRequest),
    ("interpret", pb_grpc.InterpretStub, "Traverse", pb.TraverseRequest),
    ("interpret", pb_grpc.InterpretStub, "Analyze", pb.AnalyzeRequest),
    ("interpret", pb_grpc.InterpretStub, "Edit", pb.EditRequest),
    ("interpret", pb_grpc.InterpretStub, "Translate", pb.TranslateRequest),
    ("interpret", pb_grpc.InterpretStub, "ListModels", pb.ListModelsRequest),
    ("interpret", pb_grpc.InterpretStub, "Fit", pb.FitRequest),
    ("interpret", pb_grpc.InterpretStub, "GetFitting", pb.GetFittingRequest),
    ("interpret", pb_grpc.InterpretStub, "CancelFitting", pb.CancelFittingRequest),
]

# The shipped iin_factor's layout (its params_json): 4 factors of 8 dims, a residual of 64 - 32 = 32 components,
# latents: the vector autoencoder's 64-d codes of 64x64 images, as for iin_net2net and iin_invariance, conditional on
# 384 and 70 wide sources; (4, 16, 16) latents are the LDM autoencoder's, which an IIN may interpret too.
FACTOR_VALUES = {"colour": ("red", "yellow", "green", "cyan", "blue", "purple"), "shape": ("sphere", "cube", "cone"),
                 "position": ("left", "centre", "right"), "size": ("small", "large")}  # fmt: skip
LATENT = (64,)
MAP = (4, 16, 16)  # the LDM autoencoder's latents


@st.composite
def _tensor(draw: st.DrawFn, good: list[tuple[int, ...]], bad: list[tuple[int, ...]]) -> dict:
    """Field values of a kinema.common.v1.Tensor: three draws in four right (float32 of one of the `good` shapes, finite
    values: constant or noise in [-1, 1], or huge), else wrong in one way (one of the `bad` shapes, float16, NaN)."""
    wrong = draw(st.sampled_from([None] * 9 + ["shape", "dtype", "nan"]))
    shape = draw(st.sampled_from(bad if wrong == "shape" else good))
    n = math.prod(shape)
    if wrong == "dtype":
        return {"dtype": 2, "shape": list(shape), "data": bytes(2 * n)}  # float16 zeros
    fill = draw(st.sampled_from(["noise", 0.0, 0.5, -1.0, 3e38]))
    if wrong == "nan":
        fill = float("nan")
    if fill == "noise":
        data = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(-1, 1, n).astype("<f4").tobytes()
    else:
        data = struct.pack("<f", fill) * n
    return {"dtype": 1, "shape": list(shape), "data": data}


def _models(good: list[dict], bad: list[dict]) -> st.SearchStrategy[dict]:
    """ModelRef field values: two draws in three one of `good`, else one of `bad`."""
    return st.sampled_from([0, 0, 1]).flatmap(lambda wrong: st.sampled_from(bad if wrong else good))


# Unsteered, few draws get past the first checks: each tensor's dtype, shape and byte count, then the model's own sizes
# (64x64 images, 64-d and (4, 16, 16) latents, 8-dim factors, 384 / 70 wide sources). Half of the draws of these RPCs
# are steered past them (`requests`): tensors of the right shape and dtype most of the time (else wrong in one way),
# known model names and unknown ones (conditional models where a factor model is needed and the other way round: the
# FAILED_PRECONDITION paths), factor and value names. Where an RPC takes several tensors their right shapes share B = 1,
# so that two right tensors agree.
_IMAGES = _tensor([(1, 3, 64, 64), (2, 3, 64, 64)],
                  [(17, 3, 64, 64), (1, 4, 64, 64), (1, 3, 32, 32), (2, 3, 50, 83), (1, 3, 1, 1), (1, 3, 0, 64),
                   (0, 3, 64, 64), (3, 64, 64), (1, 3, 1, 1024)])  # fmt: skip
_LATENTS = _tensor([(1, *LATENT), (2, *LATENT), (1, *MAP)], [(1, 4, 8, 8), (1, 1024), (0, *LATENT), (17, *LATENT),
                                                               LATENT])  # fmt: skip
_FACTORS = _tensor([(1, 4, 8)], [(2, 4, 8), (1, 4, 7), (1, 3, 8), (0, 4, 8), (4, 8)])
_RESIDUAL = _tensor([(1, 32)], [(2, 32), (1, 31), (32,)])
_OUTSIDE = _tensor([(1, 64)], [(2, 64), (1, 63), (1, 4, 16, 16)])
_VALUE = _tensor([(8,), (1, 8)], [(2, 8), (3,), (1, 1, 8)])
_SOURCE = _tensor([(1, 384), (2, 384)], [(1, 70), (1, 10), (0, 384), (17, 384), (384,), (1, 385), (2, 70)])
_FACTOR_MODELS = [{}, {"name": "iin_factor"}, {"name": "iin_factor", "version": "1"}]
_OTHER_MODELS = [{"name": "iin_net2net"}, {"name": "iin_invariance"}, {"name": "iin_missing"}, {"name": "midas"},
                 {"name": "iin_factor", "version": "9"}, {"version": "01"}]  # fmt: skip
_IIN = _models(_FACTOR_MODELS, _OTHER_MODELS)
_DEPTH = _models([{}, {"name": "depth"}, {"name": "depth", "version": "1"}],
                 [{"name": "depth_x"}, {"name": "midas"}, {"version": "9"}])  # fmt: skip
# Translate: right is iin_net2net on 384 wide sources; iin_invariance (70 wide) is among the wrong models, the
# 70 wide sources among the wrong shapes, so that the two meet now and then.
_TRANSLATORS = _models([{"name": "iin_net2net"}, {"name": "iin_net2net", "version": "1"}],
                       [{"name": "iin_invariance"}, *_FACTOR_MODELS, {"name": "iin_missing"},
                        {"name": "iin_net2net", "version": "2"}])  # fmt: skip
_FACTOR_NAMES = st.one_of(st.sampled_from([*FACTOR_VALUES, *FACTOR_VALUES, "hue", ""]), st.text(max_size=8))
_EDITS = [{"colour": "blue"}, {"colour": "red", "size": "large"}, {"colour": "pink"}, {"hue": "blue"},
          {"shape": "blue"}, {"colour": ""}]  # fmt: skip
_EDIT = st.one_of(
    st.sampled_from(list(FACTOR_VALUES)).flatmap(lambda f: st.sampled_from(FACTOR_VALUES[f]).map(lambda v: {f: v})),
    st.sampled_from(_EDITS),
)
_SCALES = st.one_of(st.just([]), st.lists(st.sampled_from([0.0, 1.0, -2.0, 0.5, 3e38]), max_size=4),
                    st.sampled_from([[float("nan")], [1.0, float("inf")], [1.0] * 17]))  # fmt: skip
STEERED = {
    "Estimate": {"model": _DEPTH, "images": _IMAGES},
    "Factorize": {"model": _IIN, "latents": _LATENTS},
    "Compose": {"model": _IIN, "factors": _FACTORS, "residual": _RESIDUAL, "outside": _OUTSIDE},
    "Traverse": {
        "model": _IIN,
        "latents": _LATENTS,
        "factor": _FACTOR_NAMES,
        "mode": st.sampled_from([1, 2, 1, 2, 7]),
        "value": _VALUE,
        "scales": _SCALES,
    },
    "Analyze": {"model": _IIN, "images": _IMAGES},
    "Edit": {"model": _IIN, "images": _IMAGES, "values": _EDIT},
    # Fit: its checks of kind, representation, the budget, dims, noise, rho, seed and name; past them the encoder's
    # look-up, the name's claim, the record and the queue (no worker: accepted fittings wait queued).
    "Fit": {
        "kind": st.sampled_from(["", "factor", "mle", "invariance", "net2net", "pca", "Factor"]),
        "representation": st.sampled_from(["", "vector_ae", "vae", "clip", "vector_ae_encoder"]),
        "data": st.fixed_dictionaries({"samples": st.sampled_from([0, 64, 63, 8000, 24_000, 24_001, -1, 2**31 - 1])}),
        "train_steps": st.sampled_from([0, 1, 2000, 100_000, 100_001, -1]),
        "max_seconds": st.sampled_from([0.0, 1.0, 21600.0, 21600.5, -1.0, float("nan"), float("inf")]),
        "batch": st.sampled_from([0, 1, 2, 256, 1024, 1025]),
        "components": st.sampled_from([0, 3, 4, 16, 64, 65, 128, 256, 257]),
        "factor_dims": st.sampled_from(
            [[], [8, 8, 8, 8], [2, 2, 2, 2], [8, 8, 8], [0, 1, 1, 1], [64, 1, 1, 1], [2**31 - 1] * 4]
        ),
        "noise": st.sampled_from([0.0, 0.3, 2.0, 2.5, -0.1, float("nan"), float("inf")]),
        "rho": st.sampled_from([0.5, 0.9, 0.0, 1.0, float("nan")]),
        "seed": st.sampled_from([0, 7, 2**31 - 1, 2**31, 2**64 - 1]),
        "name": st.one_of(
            st.sampled_from(["", "iin_fuzz", "iin_factor", "iin_", "iin_../x", "IIN_A"]), st.text(max_size=12)
        ),
        "eval_samples": st.sampled_from([0, 15, 16, 2000, 2001]),
    },
    "Translate": {
        "model": _TRANSLATORS,
        "source": _SOURCE,
        "seed": st.sampled_from([0, 7, 2**63, 2**64 - 1]),
        "temperature": st.sampled_from([0.0, 1.0, 0.5, 1e30, -1.0, float("nan"), float("inf")]),
    },
}
# Steered draws of these RPCs carry these fields (unset, the first check ends the call, as in most unsteered draws).
# Where a steered draw left one unset it is drawn again (`_carry`) rather than the draw filtered out, as
# tests/services/test_fuzz_distill.py does: with up to four such fields a filter would drop most steered draws.
SET = {"Estimate": ("images",), "Factorize": ("latents",), "Compose": ("factors", "residual"),
       "Traverse": ("latents", "factor", "mode", "value"), "Analyze": ("images",), "Edit": ("images", "values"),
       "Translate": ("model", "source")}  # fmt: skip


def requests(method: str, request_type: type[Message]) -> st.SearchStrategy[Message]:
    """The requests fuzzing `method` sends: `messages(request_type)`, half of them steered where STEERED says."""
    if method not in STEERED:
        return messages(request_type)
    steered = messages(request_type, overrides=STEERED[method])
    carried = st.fixed_dictionaries({f: STEERED[method][f] for f in SET.get(method, ())})
    return st.one_of(messages(request_type), st.tuples(steered, carried).map(_carry))


def _carry(drawn: tuple[Message, dict]) -> Message:
    """A steered request with each SET field it left unset set to the value drawn for it."""
    request, values = drawn
    request.MergeFrom(type(request)(**{f: v for f, v in values.items() if not _has(request, f)}))
    return request


def _has(request: Message, field: str) -> bool:
    """Whether `field` is set: a message present, a map (Edit's values) not empty, a scalar (Traverse's mode) not 0."""
    value = getattr(request, field)
    return request.HasField(field) if isinstance(value, Message) else bool(value)


@pytest.fixture(scope="module")
def fuzzed_depth_interpret(triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    """The depth and interpret services over the session's Triton, started side by side; the interpret service's
    fitting jobs on, over a redis-server of this module's own (nothing on disk, no worker)."""
    root = tmp_path_factory.mktemp("fuzz-depth-interpret")
    with RedisServer(RedisSettings(), log_path=root / "redis.log") as redis_server:
        jobs = {"interpret": {"KINEMA_REDIS_URL": redis_server.url}}
        with triton_services(triton, root, ("depth", "interpret"), jobs) as procs:
            yield procs


@pytest.mark.slow
@pytest.mark.parametrize(("service", "stub_type", "method", "request_type"), RPCS,
                         ids=[f"{s}.{m}" for s, _, m, _ in RPCS])  # fmt: skip
def test_malformed_requests_get_a_defined_status_and_the_service_stays_up(
    fuzzed_depth_interpret, service, stub_type, method, request_type
) -> None:
    check_rpc(fuzzed_depth_interpret[service], stub_type, method, requests(method, request_type))
