"""Continuous batching of concurrent sampling loops (kinema.inference.gang): each loop gets exactly its own rows, the
loops' calls share forward passes, and a loop that ends or fails never leaves the others waiting."""

from __future__ import annotations

import threading

import pytest
import torch

from kinema.inference.gang import Gang
from kinema.nn.mmdit import MMDiT, MMDiTParams
from kinema.nn.text import TextEmbedding
from kinema.pipelines.local import LocalDenoiser
from kinema.pipelines.protocols import SampleSpec
from kinema.sampling.samplers import initial_noise


@pytest.fixture(scope="module")
def mmdit() -> MMDiT:
    torch.manual_seed(0)
    model = MMDiT(MMDiTParams(depth=2, hidden_size=32, num_heads=2, sample_size=16, pos_embed_max_size=32))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval().requires_grad_(False)


def _text(seed: int, length: int = 5) -> TextEmbedding:
    g = torch.Generator().manual_seed(seed)
    return TextEmbedding(torch.randn(1, length, 384, generator=g), torch.ones(1, length, dtype=torch.bool),
                         torch.randn(1, 384, generator=g), [False])  # fmt: skip


def _run_loops(gang: Gang, denoiser: LocalDenoiser, seeds: list[int], steps: int, lengths: dict[int, int]):
    results, errors = {}, {}
    joined = threading.Barrier(len(seeds))  # every loop a member before any calls: the first pass holds them all

    def loop(seed: int) -> None:
        try:
            with gang.member():
                joined.wait()
                results[seed] = denoiser.sample(initial_noise((1, 4, 16, 16), seed), _text(seed, lengths.get(seed, 5)),
                                                _text(99), SampleSpec(steps, 4.0), None)  # fmt: skip
        except Exception as e:
            errors[seed] = e

    threads = [threading.Thread(target=loop, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a loop was left waiting"
    return results, errors


def test_concurrent_loops_share_passes_and_each_gets_its_own_result(mmdit):
    gang = Gang(mmdit)
    denoiser = LocalDenoiser(gang, "sha", latent_channels=4)
    seeds, steps = [1, 2, 3, 4], 6
    results, errors = _run_loops(gang, denoiser, seeds, steps, {})
    assert not errors
    # Fewer passes than one per loop per step: the loops' calls were batched.
    assert gang.passes < len(seeds) * steps
    alone = LocalDenoiser(mmdit, "sha")
    for s in seeds:
        want = alone.sample(initial_noise((1, 4, 16, 16), s), _text(s), _text(99), SampleSpec(steps, 4.0), None)
        # batched with others vs alone: float rounding differs with batch size; a mix-up would be O(1)
        torch.testing.assert_close(results[s], want, atol=1e-4, rtol=0)


def test_a_call_outside_any_loop_runs_alone_and_exactly(mmdit):
    gang = Gang(mmdit)
    x = initial_noise((2, 4, 16, 16), 0)
    mask = torch.ones(2, 5, dtype=torch.bool)
    args = (x, torch.tensor([0.3, 0.7]), torch.randn(2, 5, 384), torch.randn(2, 384), mask)
    with torch.inference_mode():
        assert torch.equal(gang(*args), mmdit(*args)) and gang.passes == 1


def test_loops_of_different_text_lengths_run_in_separate_passes(mmdit):
    gang = Gang(mmdit)
    denoiser = LocalDenoiser(gang, "sha", latent_channels=4)
    results, errors = _run_loops(gang, denoiser, [1, 2], 3, {1: 5, 2: 7})
    assert not errors and set(results) == {1, 2}
    alone = LocalDenoiser(mmdit, "sha")
    want = alone.sample(initial_noise((1, 4, 16, 16), 2), _text(2, 7), _text(99), SampleSpec(3, 4.0), None)
    torch.testing.assert_close(results[2], want, atol=1e-4, rtol=0)


def test_a_failing_pass_fails_only_the_loop_at_fault():
    calls = []

    def network(x, t, context, pooled, mask):
        calls.append(x.shape[0])
        if (x.abs() > 1e6).any():
            raise RuntimeError("bad rows")
        return torch.zeros_like(x)

    gang = Gang(network)
    denoiser = LocalDenoiser(gang, "sha", latent_channels=4)
    done, errors = {}, {}
    joined = threading.Barrier(2)

    def loop(name: str, noise: torch.Tensor, steps: int) -> None:
        try:
            with gang.member():
                joined.wait()
                done[name] = denoiser.sample(noise, _text(0), _text(1), SampleSpec(steps, 4.0), None)
        except RuntimeError as e:
            errors[name] = e

    bad = torch.full((1, 4, 16, 16), 1e7)
    threads = [threading.Thread(target=loop, args=("bad", bad, 3)),
               threading.Thread(target=loop, args=("good", initial_noise((1, 4, 16, 16), 0), 8))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    # The pass that held both failed; run again one loop at a time, only the bad loop's call fails.
    assert set(errors) == {"bad"} and set(done) == {"good"}
    assert 4 in calls  # the two loops did share a pass (2 rows each: CFG)


def test_max_rows_splits_a_large_gang(mmdit):
    gang = Gang(mmdit, max_rows=4)  # 2 rows per loop (CFG): at most two loops a pass
    denoiser = LocalDenoiser(gang, "sha", latent_channels=4)
    results, errors = _run_loops(gang, denoiser, [1, 2, 3, 4, 5], 2, {})
    assert not errors and len(results) == 5
