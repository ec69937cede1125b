"""Client side of the status mapping: `from_rpc_error` inverts `to_status` (no server needed)."""

import grpc
import pytest

from kinema import errors
from kinema.rpc.status import CODES, ERROR_DETAIL_KEY, error_detail, from_rpc_error, to_status


class FakeRpcError(grpc.RpcError, grpc.Call):
    """What a failed sync call raises: an RpcError that is also a Call (code, details, trailing metadata)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


def _over_the_wire(exc: BaseException, request_id: str = "") -> FakeRpcError:
    status = to_status(exc, request_id)
    return FakeRpcError(status.code, status.details, status.trailing_metadata)


@pytest.mark.parametrize(("kind", "code"), CODES)
def test_every_domain_error_round_trips_with_reason_field_and_request_id(kind, code) -> None:
    sent = kind("steps must be in 1..1000, got 1001", reason="OUT_OF_RANGE", field="steps", metadata={"max": "1000"})
    err = _over_the_wire(sent, request_id="job-42")
    assert err.code() == code
    got = from_rpc_error(err)
    assert type(got) is kind
    assert str(got) == str(sent)
    assert (got.reason, got.field) == ("OUT_OF_RANGE", "steps")
    assert got.metadata == {"max": "1000", "request_id": "job-42", "grpc_code": code.name}


def test_python_bases_survive_the_trip() -> None:
    assert isinstance(from_rpc_error(_over_the_wire(errors.DeadlineExceeded("slow"))), TimeoutError)
    assert isinstance(from_rpc_error(_over_the_wire(errors.InvalidInput("bad"))), ValueError)
    assert isinstance(from_rpc_error(_over_the_wire(errors.NotFound("who"))), LookupError)


def test_error_without_trailer_keeps_the_message_and_no_reason() -> None:
    got = from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "model 'clip_l' is not served"))
    assert type(got) is errors.NotFound and str(got) == "model 'clip_l' is not served"
    assert (got.reason, got.field, got.metadata) == ("", "", {"grpc_code": "NOT_FOUND"})


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNIMPLEMENTED],
)
def test_codes_without_a_domain_error_give_a_plain_kinema_error_named_by_the_code(code) -> None:
    got = from_rpc_error(FakeRpcError(code, "internal error (request id abc)"))
    assert type(got) is errors.KinemaError
    assert got.reason == code.name and got.metadata["grpc_code"] == code.name
    assert str(got) == "internal error (request id abc)"


def test_an_unexpected_error_stays_internal_through_the_trip() -> None:
    got = from_rpc_error(_over_the_wire(RuntimeError("secret path /srv/x"), request_id="r1"))
    assert type(got) is errors.KinemaError and got.reason == "INTERNAL"
    assert "secret" not in str(got) and "r1" in str(got)


def test_trailer_reason_wins_over_the_code_name() -> None:
    detail = error_detail(errors.KinemaError("x", reason="BACKEND_BUG"))
    err = FakeRpcError(grpc.StatusCode.INTERNAL, "x", ((ERROR_DETAIL_KEY, detail.SerializeToString()),))
    assert from_rpc_error(err).reason == "BACKEND_BUG"


def test_empty_details_and_a_bare_rpc_error() -> None:
    got = from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, ""))
    assert type(got) is errors.Unavailable and str(got) == "unavailable"
    bare = from_rpc_error(grpc.RpcError())  # not a Call: nothing but its type
    assert type(bare) is errors.KinemaError and bare.reason == "UNKNOWN"


def test_a_retry_hint_travels_as_retry_info_and_retry_after_ms() -> None:
    from google.rpc import error_details_pb2, status_pb2

    from kinema.rpc.status import RETRY_AFTER_KEY, STATUS_DETAILS_KEY, parse_retry_after

    sent = errors.ResourceExhausted("busy", reason="SERVER_BUSY", metadata={"limit": "4"}, retry_after=1.25)
    err = _over_the_wire(sent, request_id="r1")
    trailers = dict(err.trailing_metadata())
    assert trailers[RETRY_AFTER_KEY] == "1250"
    status = status_pb2.Status.FromString(trailers[STATUS_DETAILS_KEY])
    # The rich status repeats the call's code and message, as gRPC's status libraries require.
    assert (status.code, status.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "busy")
    retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.ToTimedelta().total_seconds() == 1.25
    assert status.details[1].Unpack(info) and (info.reason, info.domain, info.metadata["limit"]) == (
        "SERVER_BUSY", "kinema", "4")  # fmt: skip
    got = from_rpc_error(err)
    assert type(got) is errors.ResourceExhausted and got.retry_after == 1.25 and got.reason == "SERVER_BUSY"
    # Without the rich details (a proxy dropped them) the plain trailer still says it; garbage says nothing.
    assert parse_retry_after(((RETRY_AFTER_KEY, "300"),)) == 0.3
    assert parse_retry_after(((STATUS_DETAILS_KEY, b"\xff\xff"), (RETRY_AFTER_KEY, "20"))) == 0.02
    assert parse_retry_after(((RETRY_AFTER_KEY, "soon"),)) is None


def test_errors_without_a_hint_carry_no_retry_trailers() -> None:
    from kinema.rpc.status import RETRY_AFTER_KEY, STATUS_DETAILS_KEY

    err = _over_the_wire(errors.ResourceExhausted("batch too large", reason="BATCH_TOO_LARGE"))
    keys = {key for key, _ in err.trailing_metadata()}
    assert RETRY_AFTER_KEY not in keys and STATUS_DETAILS_KEY not in keys
    assert from_rpc_error(err).retry_after is None
