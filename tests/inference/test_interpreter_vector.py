"""An IIN over the vector autoencoder's code, served in process beside that autoencoder: the Interpreter picks the
autoencoder the model names (`representation`), checks images against its size and decodes edits through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kinema.errors import InvalidInput
from kinema.inference.interpreter import Interpreter
from kinema.inference.runner import LocalRunner
from kinema.nn.vector_ae import VectorAutoencoder, VectorAutoencoderParams
from kinema.train import vector_ae
from kinema.train.autoencoder import to_tensor
from kinema.train.iin import FactorData, IINTrainConfig, build_model, export, render_single_objects, set_prototypes


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_an_iin_over_the_vector_autoencoder_analyzes_and_edits_through_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    torch.manual_seed(0)
    ae = VectorAutoencoder(VectorAutoencoderParams(channels=(8, 16, 16, 16), dim=12)).eval()
    vector_ae.export(ae, models, {"seed": 0}, "python -m kinema.train.vector_ae ...")
    raw = render_single_objects("train", 0, 96)
    with torch.no_grad():
        codes = ae.encode(to_tensor(raw["images"]))
    data = FactorData(torch.from_numpy(raw["images"]), codes, *(torch.tensor(raw[k]) for k in ("colour", "shape",
                      "size")), torch.tensor(raw["u"]).float(), raw["captions"])  # fmt: skip
    cfg = IINTrainConfig(kind="factor", representation="vector_ae", components=12, blocks=2, hidden=16,
                         factor_dims=(2, 2, 2, 2))  # fmt: skip
    model, edges, _ = build_model(cfg, data, None)
    set_prototypes(model, data, edges)
    export(model.eval(), cfg, models / "iin_vec", {"seed": 0}, "python -m kinema.train.iin ...")

    interpreter = Interpreter(LocalRunner(models))
    images = to_tensor(raw["images"][:3]).numpy()
    analysis = interpreter.analyze("iin_vec", "", images)
    assert analysis.autoencoder.name == "vector_ae" and len(analysis.autoencoder.sha256) == 64
    assert [r.factor for r in analysis.factors] == ["colour", "shape", "position", "size"]
    assert analysis.factors[0].scores.shape == (3, 6)

    edited = interpreter.edit("iin_vec", "", images, {"colour": "blue"})
    with torch.no_grad():  # the same edit in process: codes -> z_colour := blue's prototype -> decode, clamped
        expected = ae.decode(model.edit(ae.encode(torch.from_numpy(images)), {"colour": "blue"})).clamp(-1, 1)
    np.testing.assert_allclose(edited.images, expected.numpy(), atol=1e-3)
    assert edited.autoencoder.name == "vector_ae"

    with pytest.raises(InvalidInput, match="interprets 64x64 images, got 32x32") as e:
        interpreter.analyze("iin_vec", "", np.zeros((1, 3, 32, 32), np.float32))
    assert e.value.field == "images"
