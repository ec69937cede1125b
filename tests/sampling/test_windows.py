"""Window planning and the blend of overlapping windows' velocities (kinema.sampling.windows)."""

import itertools

import pytest
import torch

from kinema.sampling.temporal import COND_FRAME, COND_VIDEO
from kinema.sampling.windows import cycling, plan_windows, window_plans, window_weights, windowed_predictor


@pytest.mark.parametrize(
    ("frames", "window", "overlap", "expected"),
    [
        (5, 8, 2, [(0, 5)]),
        (8, 8, 2, [(0, 8)]),
        (20, 8, 2, [(0, 8), (6, 14), (12, 20)]),
        (17, 8, 2, [(0, 8), (6, 14), (9, 17)]),
        (10, 4, 0, [(0, 4), (4, 8), (6, 10)]),
    ],
)
def test_windows_cover_the_clip_and_share_at_least_the_overlap(frames, window, overlap, expected):
    windows = plan_windows(frames, window, overlap)
    assert windows == expected
    covered = set().union(*(range(s, e) for s, e in windows))
    assert covered == set(range(frames))
    for (s0, e0), (s1, _) in itertools.pairwise(windows):
        assert e0 - s1 >= overlap and s1 > s0


def test_the_plans_are_the_first_shifted_by_every_offset_in_the_stride():
    plans = window_plans(20, 8, 4)
    assert plans == [plan_windows(20, 8, 4, offset) for offset in range(4)]
    assert plans[0] == [(0, 8), (4, 12), (8, 16), (12, 20)]
    assert plans[1] == [(0, 8), (1, 9), (5, 13), (9, 17), (12, 20)]
    # past the first window (there in every plan), each pair of frames (i, i + 1) is at a window's end in one plan
    edges = [{e - 1 for _, e in plan[:-1]} for plan in plans]
    assert [sum(i in e for e in edges) for i in range(8, 19)] == [1] * 11
    assert window_plans(6, 8, 4) == [[(0, 6)]]  # fits one window: nothing to cycle
    assert window_plans(10, 4, 3) == [plan_windows(10, 4, 3)]  # stride 1: one plan


def test_cycling_goes_through_its_predictors_call_by_call():
    predict = cycling([_constant(0.0), _constant(5.0)])
    x = torch.zeros(1, 2, 1, 1, 1)
    got = [float(predict(x, torch.ones(1), (COND_FRAME,))[0].mean()) for _ in range(5)]
    assert got == [0, 5, 0, 5, 0]


def test_window_weights_are_a_tent_lowest_at_the_edges():
    assert window_weights(6).tolist() == [1, 2, 3, 3, 2, 1]
    assert window_weights(5).tolist() == [1, 2, 3, 2, 1]
    assert window_weights(1).tolist() == [1]


def _constant(value: float):
    """A window predictor whose every branch answers `value` everywhere (branch k: value + k)."""

    def predict(x, t, branches):
        return [torch.full_like(x, value + k) for k in range(len(branches))]

    return predict


def test_overlapping_velocities_are_the_tent_weighted_mean():
    # windows [0, 4) answering 0 and [2, 6) answering 10: frames 2, 3 are shared
    predict = windowed_predictor([((0, 4), _constant(0.0)), ((2, 6), _constant(10.0))], 6)
    x = torch.zeros(1, 6, 2, 3, 3)
    cond, video = predict(x, torch.ones(1), (COND_FRAME, COND_VIDEO))
    per_frame = cond[0, :, 0, 0, 0].tolist()
    # frame 2: weight 2 in the first window (tent 1,2,2,1), 1 in the second -> (2*0 + 1*10) / 3
    assert per_frame == pytest.approx([0, 0, 10 / 3, 20 / 3, 10, 10])
    assert torch.allclose(video, cond + 1)  # every branch is blended the same way
    assert cond.shape == x.shape


def test_each_window_sees_only_its_frames():
    seen = []

    def record(x, t, branches):
        seen.append(x[0, :, 0, 0, 0].tolist())
        return [x.clone() for _ in branches]

    predict = windowed_predictor([((0, 3), record), ((2, 5), record)], 5)
    x = torch.arange(5.0).view(1, 5, 1, 1, 1).expand(1, 5, 1, 2, 2).clone()
    (v,) = predict(x, torch.ones(1), (COND_VIDEO,))
    assert seen == [[0, 1, 2], [2, 3, 4]]
    assert torch.allclose(v, x)  # windows that agree blend to the same value


def test_one_window_over_the_whole_clip_is_the_predictor_itself():
    window = _constant(1.0)
    assert windowed_predictor([((0, 7), window)], 7) is window


def test_windows_must_cover_the_clip_inside_it():
    with pytest.raises(ValueError, match="uncovered"):
        windowed_predictor([((0, 3), _constant(0.0)), ((4, 6), _constant(0.0))], 6)
    with pytest.raises(ValueError, match="not inside"):
        windowed_predictor([((0, 7), _constant(0.0))], 6)
