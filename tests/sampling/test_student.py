"""Few-step sampling for LADD students: the trained times, their schedules, Euler and fresh-noise steps."""

import itertools

import pytest
import torch

from kinema.sampling import get_schedule, sample_euler, sample_student, student_schedule, student_timesteps


def test_student_times_are_the_papers_discrete_set():
    assert student_timesteps(4) == [1.0, 0.75, 0.5, 0.25]
    assert student_timesteps(1) == [1.0]
    assert student_schedule(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert student_schedule(2) == [1.0, 0.5, 0.0]  # a subset of the times the 4-step student trained at
    assert student_schedule(1) == [1.0, 0.0]
    assert student_schedule(4) == get_schedule(4)  # so the plain Euler pipeline (guidance 1) samples a student
    with pytest.raises(ValueError, match="divide"):
        student_schedule(3)
    with pytest.raises(ValueError, match="at least 1"):
        student_timesteps(0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_perfect_student_lands_on_its_target_with_or_without_fresh_noise(steps):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=g)

    def velocity(x, t):  # the velocity whose x0 prediction x - t v is exactly x0 at every time
        assert t.shape == (3,)
        return (x - x0) / t.view(-1, 1, 1, 1)

    noise = torch.randn(3, 4, 5, 5, generator=g)
    for generator in (None, torch.Generator().manual_seed(1)):
        out = sample_student(velocity, noise.clone(), student_schedule(steps), generator=generator)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_without_a_generator_it_is_euler_and_with_one_it_renoises_to_each_time():
    g = torch.Generator().manual_seed(0)
    x1, c = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    velocity = lambda x, t: torch.tanh(x) + c  # any non-trivial field
    schedule = student_schedule(4)
    torch.testing.assert_close(sample_student(velocity, x1, schedule), sample_euler(velocity, x1, schedule))

    seen = []
    out = sample_student(velocity, x1, schedule, generator=torch.Generator().manual_seed(3),
                         callback=lambda i, n, x: seen.append((i, n, x.clone())))  # fmt: skip
    assert [(i, n) for i, n, _ in seen] == [(i, 4) for i in range(4)]
    # Re-noising by hand with the same generator reproduces every step: x = (1 - t') (x - t v) + t' eps.
    gen, x = torch.Generator().manual_seed(3), x1
    for (t, t_next), (_, _, got) in zip(itertools.pairwise(schedule), seen, strict=True):
        x0 = x - t * velocity(x, torch.full((2,), t))
        x = x0 if t_next == 0 else (1 - t_next) * x0 + t_next * torch.randn(x.shape, generator=gen)
        torch.testing.assert_close(got, x)
    assert torch.equal(out, seen[-1][2])
    again = sample_student(velocity, x1, schedule, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # seeded: bit for bit


def test_one_generator_per_row_makes_each_row_independent_of_the_batch():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(3, 2, 4, 4, generator=g)
    velocity = lambda x, t: torch.tanh(x) + t.view(-1, 1, 1, 1)  # row by row, as a network is
    schedule = student_schedule(4)
    rows = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    batch = sample_student(velocity, x1, schedule, generator=rows)
    alone = sample_student(velocity, x1[1:2], schedule, generator=[torch.Generator().manual_seed(8)])
    torch.testing.assert_close(alone[0], batch[1], atol=1e-6, rtol=0)  # row 1 alone = row 1 in the batch
    # one generator of seed s for a single row is the same stream as [Generator(s)]
    single = sample_student(velocity, x1[1:2], schedule, generator=torch.Generator().manual_seed(8))
    assert torch.equal(single, alone)
    with pytest.raises(ValueError, match="one generator per row"):
        sample_student(velocity, x1, schedule, generator=rows[:2])
