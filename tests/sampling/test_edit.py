"""SDEdit's start and the latent-inpainting blend (kinema.sampling.edit) with closed-form velocity fields."""

import math

import numpy as np
import pytest
import torch

from kinema.sampling import get_schedule, initial_noise, sample_euler, sample_heun
from kinema.sampling.edit import blend, noised, sample_masked, start_latents, start_step

SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


@pytest.mark.parametrize(("steps", "strength", "start"), [(10, 1.0, 0), (10, 0.6, 4), (10, 0.55, 4), (10, 0.01, 9),
                                                           (28, 0.8, 5), (1, 0.3, 0), (1000, 0.6, 400)])  # fmt: skip
def test_start_step_runs_the_last_ceil_strength_steps(steps, strength, start) -> None:
    assert start_step(steps, strength) == start == steps - math.ceil(round(strength * steps, 4))
    # float32 strength (how the proto carries it) runs as many steps as the float64 one
    assert start_step(steps, float(np.float32(strength))) == start


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan")])
def test_start_step_rejects_a_strength_out_of_range(bad) -> None:
    with pytest.raises(ValueError, match="strength"):
        start_step(10, bad)


def test_noised_is_the_straight_path_and_strength_one_starts_from_the_noise() -> None:
    x0, eps = initial_noise((2, 4, 8, 8), 1), initial_noise((2, 4, 8, 8), 2)
    assert torch.equal(noised(x0, eps, 1.0), eps)  # bit for bit: an edit at strength 1 is text-to-image's start
    assert torch.equal(noised(x0, eps, 0.0), x0)
    torch.testing.assert_close(noised(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps)
    assert start_latents(eps, 0.3, None) is eps


@pytest.mark.parametrize("name", SAMPLERS)
def test_sample_masked_keeps_the_known_latents_and_samples_the_rest_as_the_plain_loop(name) -> None:
    sampler = SAMPLERS[name]
    target = torch.full((1, 2, 4, 4), 3.0)
    velocity = lambda x, t: (x - target) / t[:, None, None, None].clamp_min(1e-3)  # flows straight to `target`
    known, eps = initial_noise((1, 2, 4, 4), 5), initial_noise((1, 2, 4, 4), 6)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1  # generate the top half
    schedule = get_schedule(8)[3:]
    x = noised(known, eps, schedule[0])
    seen = []
    out = sample_masked(sampler, velocity, x, schedule, known=known, noise=eps, mask=mask,
                        callback=lambda i, n, x: seen.append((i, n)))  # fmt: skip
    assert seen == [(i, 5) for i in range(5)]
    assert torch.equal(out[..., 2:, :], known[..., 2:, :])  # kept exactly: the last blend is at t = 0
    plain = sampler(velocity, x, schedule)
    assert torch.equal(out[..., :2, :], plain[..., :2, :])  # the velocity is per pixel: inside, the same arithmetic
    torch.testing.assert_close(out[..., :2, :], target[..., :2, :])
    everywhere = sample_masked(sampler, velocity, x, schedule, known=known, noise=eps, mask=torch.ones(1, 1, 4, 4))
    assert torch.equal(everywhere, plain)


def test_blend_mixes_by_the_mask() -> None:
    x, known, eps = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    out = blend(x, known, eps, mask, 0.5)  # x_t(known) = 0.5 + 1.0 = 1.5
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 1.5], [0.75, 1.5]]]]))
