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
