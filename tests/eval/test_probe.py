"""The attribute probe: accuracy on ground-truth renders, robustness, and scoring on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from kinema.data import World
from kinema.eval.probe import DEFAULT_WEIGHTS, DetectedObject, Probe, ProbeResult, segment
from kinema.eval.scoring import Truth, aggregate, evaluate_world, score


@pytest.fixture(scope="module")
def probe() -> Probe:
    return Probe.from_file(DEFAULT_WEIGHTS)


@pytest.mark.slow
def test_probe_is_right_on_ground_truth_renders(probe: Probe) -> None:
    result = evaluate_world(probe, split="test", n=300)
    assert result["colour_shape"] >= 0.98
    assert result["relation"] >= 0.98
    assert result["n_relation"] > 100  # enough multi-object scenes to mean something


@pytest.mark.slow
def test_probe_survives_blur_and_noise(probe: Probe) -> None:
    result = evaluate_world(probe, split="test", n=100, start=300, blur=1.0, noise=0.02)
    assert result["colour"] >= 0.97
    assert result["colour_shape"] >= 0.9


@pytest.mark.parametrize("grey", [0, 90, 128, 200, 255])
def test_blank_grey_image_has_no_objects(probe: Probe, grey: int) -> None:
    assert probe(np.full((64, 64, 3), grey, np.uint8)).objects == ()


def test_probe_reads_one_render_in_any_format_and_size(probe: Probe) -> None:
    sample = World().sample("test", 3)
    truth = Truth.from_sample(sample)
    u8 = np.round(sample.rgb * 255).astype(np.uint8)
    big = u8.repeat(2, axis=0).repeat(2, axis=1)  # 128 px
    for image in (sample.rgb, u8, big):
        found = probe(image)
        assert tuple((o.colour, o.shape) for o in found.objects) == truth.objects
        assert [o.u for o in found.objects] == sorted(o.u for o in found.objects)
    labels = {o.colour: o.image_position[0] for o in sample.objects}
    for o in probe(u8).objects:
        assert abs(o.u - labels[o.colour]) < 0.1


def test_segment_rejects_bad_shapes_and_ranges() -> None:
    with pytest.raises(ValueError, match="H, W, 3"):
        segment(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        segment(np.full((64, 64, 3), 200.0))


def test_missing_weights_say_how_to_train(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="--train"):
        Probe.from_file(tmp_path / "nope.safetensors")


def _objs(*items: tuple[str, str, float]) -> ProbeResult:
    return ProbeResult(tuple(DetectedObject(c, s, u, 0.5, 0.05) for c, s, u in items))


TRUTH = Truth((("red", "cube"), ("blue", "sphere")))  # red left of blue


def test_score_perfect_detection() -> None:
    s = score(_objs(("red", "cube", 0.3), ("blue", "sphere", 0.7)), TRUTH)
    assert s == {"colour_shape": 1.0, "colour": 1.0, "shape": 1.0, "relation": 1.0, "count_exact": 1.0}


def test_score_swapped_order_has_no_relation_right() -> None:
    s = score(_objs(("blue", "sphere", 0.3), ("red", "cube", 0.7)), TRUTH)
    assert s["relation"] == 0.0
    assert s["colour_shape"] == 1.0


def test_score_missing_object_and_wrong_shape() -> None:
    s = score(_objs(("red", "cone", 0.3)), TRUTH)
    assert s == {"colour_shape": 0.0, "colour": 0.5, "shape": 0.0, "relation": 0.0, "count_exact": 0.0}
    s = score(_objs(("red", "sphere", 0.3), ("green", "cube", 0.5), ("blue", "sphere", 0.7)), TRUTH)
    assert s["colour_shape"] == 0.5 and s["shape"] == 1.0 and s["relation"] == 1.0 and s["count_exact"] == 0.0


def test_score_three_objects_counts_ordered_pairs() -> None:
    truth = Truth((("red", "cube"), ("green", "cone"), ("blue", "sphere")))
    s = score(_objs(("green", "cone", 0.2), ("red", "cube", 0.5), ("blue", "sphere", 0.8)), truth)
    assert s["relation"] == pytest.approx(2 / 3)  # red<green wrong, red<blue and green<blue right


def test_score_uses_largest_segment_of_a_colour() -> None:
    detected = [DetectedObject("red", "cone", 0.9, 0.5, 0.001), DetectedObject("red", "cube", 0.2, 0.5, 0.05)]
    detected.append(DetectedObject("blue", "sphere", 0.6, 0.5, 0.05))
    s = score(detected, TRUTH)
    assert s["colour_shape"] == 1.0 and s["relation"] == 1.0


def test_single_object_has_no_relation_and_aggregate_skips_it() -> None:
    one = score(_objs(("red", "cube", 0.5)), Truth((("red", "cube"),)))
    assert one["relation"] is None
    two = score(_objs(("blue", "sphere", 0.3), ("red", "cube", 0.7)), TRUTH)
    agg = aggregate([one, two])
    assert agg["n"] == 2 and agg["n_relation"] == 1
    assert agg["relation"] == 0.0 and agg["colour_shape"] == 1.0


def test_truth_rejects_repeated_colours() -> None:
    with pytest.raises(ValueError, match="distinct"):
        Truth((("red", "cube"), ("red", "cone")))


def test_the_probe_is_read_from_kinema_models_when_it_is_set(tmp_path, monkeypatch):
    """A worker or image with a mounted model repository reads the probe there, not beside the package."""
    import shutil

    from kinema.eval.probe import default_weights

    (tmp_path / "probe").mkdir()
    shutil.copy(DEFAULT_WEIGHTS, tmp_path / "probe" / "probe.safetensors")
    monkeypatch.setenv("KINEMA_MODELS", str(tmp_path))
    assert default_weights() == tmp_path / "probe" / "probe.safetensors"
    assert Probe.from_file() is not None
    monkeypatch.setenv("KINEMA_MODELS", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        Probe.from_file()
