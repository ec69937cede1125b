"""Request checks the model services share: model versions and the text conditioning's shape."""

import numpy as np
import pytest

from kinema.denoiser.v1 import denoiser_pb2
from kinema.distill.v1 import distill_pb2
from kinema.errors import InvalidInput
from kinema.orchestration.distillation import DistillationSpec
from kinema.rpc import tensors
from kinema.rpc.denoising import conditioning
from kinema.rpc.models import check_version


@pytest.mark.parametrize("version", ["", "1", "12", "900000000000000000"])
def test_versions_triton_takes_pass(version):
    check_version(version, "model.version")


# Unicode digits pass str.isdigit() and reached Triton, which answered without naming the field (bench/fuzz.py).
@pytest.mark.parametrize("version", ["0", "01", "-1", "1.0", " 1", "\u00b2", "\u0663", "9" * 30, "latest"])
def test_other_versions_are_invalid_argument_naming_the_field(version):
    with pytest.raises(InvalidInput, match=r"teacher\.version must be a positive integer") as e:
        check_version(version, "teacher.version")
    assert e.value.field == "teacher.version" and e.value.reason == "INVALID_VERSION"
    request = distill_pb2.StartDistillationRequest()
    request.teacher.version = version
    with pytest.raises(InvalidInput) as e:
        DistillationSpec.from_request(request)
    assert e.value.field == "teacher.version"


def _wire(b: int, length: int) -> denoiser_pb2.Conditioning:
    return denoiser_pb2.Conditioning(tokens=tensors.encode(np.zeros((b, length, 384), np.float32)),
                                     mask=tensors.encode(np.ones((b, length), np.bool_)),
                                     pooled=tensors.encode(np.zeros((b, 384), np.float32)))  # fmt: skip


def test_conditioning_takes_agreeing_shapes_and_refuses_an_empty_batch_or_text():
    assert conditioning(_wire(2, 3), "cond").tokens.shape == (2, 3, 384)
    for b, length in ((0, 3), (1, 0)):  # L = 0 reached the network and came back as UNAVAILABLE
        with pytest.raises(InvalidInput, match="B > 0 and L > 0") as e:
            conditioning(_wire(b, length), "cond")
        assert e.value.field == "cond"
