import itertools
import math

import pytest
import torch

from kinema.sampling import (
    cfg_velocity,
    get_schedule,
    initial_noise,
    logit_normal_t,
    resolution_shift,
    sample_euler,
    sample_heun,
    shift_sigmas,
)

SAMPLERS = {"euler": sample_euler, "heun": sample_heun}
SCHEDULES = {
    "one-step": get_schedule(1),
    "uniform": get_schedule(10),
    "shifted": get_schedule(7, shift=3.0),
    "ragged": [1.0, 0.93, 0.5, 0.49, 0.1, 0.0],
}


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 6.0])
def test_shift_keeps_endpoints_and_is_monotone(shift):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = shift_sigmas(t, shift)
    assert s[0] == 0 and s[-1] == 1
    assert (s.diff() > 0).all()


def test_shift_known_values():
    assert shift_sigmas(0.5, 3.0) == pytest.approx(0.75)  # SD3 eq. 23: 1.5 / 2
    assert shift_sigmas(0.3, 1.0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="positive"):
        shift_sigmas(0.5, 0.0)


def test_resolution_shift_is_sqrt_of_token_ratio():
    assert resolution_shift(4096) == pytest.approx(4.0)  # 1024^2 vs the 256^2 base, SD3 sec. 5.3.2
    assert resolution_shift(256, base_tokens=256, base_shift=3.0) == pytest.approx(3.0)
    assert resolution_shift(1024, base_tokens=256, base_shift=1.5) == pytest.approx(3.0)


@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (4, 1.0), (28, 3.0)])
def test_schedule_runs_from_noise_to_data(steps, shift):
    s = get_schedule(steps, shift)
    assert len(s) == steps + 1 and s[0] == 1.0 and s[-1] == 0.0
    assert all(a > b for a, b in itertools.pairwise(s))
    assert s[steps // 2] == pytest.approx(shift_sigmas(1 - (steps // 2) / steps, shift))


def test_logit_normal_statistics():
    m, s = 0.5, 0.8
    t = logit_normal_t(100_000, m, s, generator=torch.Generator().manual_seed(0))
    assert t.shape == (100_000,) and ((t > 0) & (t < 1)).all()
    u = torch.logit(t.double())
    assert u.mean().item() == pytest.approx(m, abs=0.02)
    assert u.std().item() == pytest.approx(s, abs=0.02)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_samplers_are_exact_on_a_straight_flow(sampler, schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    times_seen = []

    def velocity(x, t):
        times_seen.append(t)
        return eps - x0  # the true velocity of x_t = (1 - t) x0 + t eps, whatever x and t

    out = SAMPLERS[sampler](velocity, eps.clone(), SCHEDULES[schedule])
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert all(t.shape == (3,) for t in times_seen)


def test_heun_is_more_accurate_than_euler_on_a_curved_flow():
    x1 = torch.ones(2, 3)  # dx/dt = x from t=1 to t=0 gives x(0) = x(1) / e
    schedule = get_schedule(8)
    exact = x1 / math.e
    err_euler = (sample_euler(lambda x, t: x, x1, schedule) - exact).abs().max()
    err_heun = (sample_heun(lambda x, t: x, x1, schedule) - exact).abs().max()
    assert err_heun < 0.2 * err_euler


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_callback_reports_every_step(sampler):
    calls = []
    SAMPLERS[sampler](lambda x, t: -x, torch.ones(1, 2), get_schedule(5), callback=lambda i, n, x: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(5)]


def test_cfg_velocity():
    cond, uncond = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_velocity(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_velocity(cond, uncond, 0.0), uncond)
    assert torch.equal(cfg_velocity(cond, uncond, 4.0), torch.tensor([5.0, 1.0]))


def test_seeds_reproduce_bit_for_bit():
    a, b = initial_noise((2, 4, 8, 8), seed=123), initial_noise((2, 4, 8, 8), seed=123)
    assert torch.equal(a, b)
    assert not torch.equal(a, initial_noise((2, 4, 8, 8), seed=124))
    assert torch.equal(
        logit_normal_t(16, generator=torch.Generator().manual_seed(5)),
        logit_normal_t(16, generator=torch.Generator().manual_seed(5)),
    )
    # a whole sampling run from the same seed is bit-identical too
    run = lambda: sample_heun(lambda x, t: torch.tanh(x) * t[:, None], initial_noise((3, 6), seed=9), get_schedule(6))
    assert torch.equal(run(), run())
