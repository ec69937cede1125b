"""Sampling a clip longer than the network's window: every window at every step, velocities blended where they
overlap (MultiDiffusion, Bar-Tal et al. 2023, over time instead of space).

A video network sees at most `max_frames` frames at once. Sampling the windows one after the other and blending
each new window towards the one before leaves a seam: the older window never sees the newer one, so where they meet
the clip jumps. Here each step evaluates every window on the current latents of the whole clip and averages the
velocities of the windows that hold a frame, weighted by how far the frame sits inside each window:

    v(x)[i] = sum_k w_k(i) v_k(x[window k])[i] / sum_k w_k(i)

with w_k ramping up from the window's edges (`window_weights`), so a frame near a window's edge follows the
neighbouring window more and no frame changes hands at once. MultiDiffusion's step is the least-squares fit of the
windows' steps; with Euler steps that is exactly this blend of velocities. Every frame's latents move together,
so windows agree where they meet long before t = 0.

Blending alone still leaves a faint seam where the same frames sit at window edges at every step. The steps
therefore cycle through the plan shifted by every offset in the stride (`window_plans`, `cycling`): each pair of
neighbouring frames is at a window's edge at few of the steps, and the temporal layers see across every boundary at
most steps.

The blend is linear, so it commutes with classifier- and temporal-guidance (both linear in the branches): blending
each branch, as `windowed_predictor` does, equals blending the guided velocities.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from kinema.sampling.temporal import BranchPredictor


def plan_windows(frames: int, window: int, overlap: int, offset: int = 0) -> list[tuple[int, int]]:
    """[start, end) ranges of `window` frames that cover 0..frames-1, each sharing at least `overlap` frames with
    the one before; the last is moved back to end at the last frame (it may overlap more). One range if it fits.
    With `offset` (0..stride-1) the windows after the first start `offset` frames later: the same cover, shifted."""
    if frames <= window:
        return [(0, frames)]
    stride = window - overlap
    starts = sorted({0, *range(offset, frames - window, stride), frames - window})
    return [(s, s + window) for s in starts]


def window_plans(frames: int, window: int, overlap: int) -> list[list[tuple[int, int]]]:
    """The window plans the steps of a run cycle through (`cycling`): `plan_windows` at every offset
    0..stride-1, so past the first window (in every plan) each pair of neighbouring frames is at a window's end in
    one plan only, and no boundary stays in one place for the whole run. One plan when the clip fits one window."""
    plans: list[list[tuple[int, int]]] = []
    for offset in range(window - overlap):
        plan = plan_windows(frames, window, overlap, offset)
        if plan not in plans:
            plans.append(plan)
    return plans


def window_weights(length: int) -> Tensor:
    """(length,) weights of a window's frames in the blend: min(k + 1, length - k), a tent that is highest in the
    middle and lowest (1) at both edges."""
    k = torch.arange(length, dtype=torch.float32)
    return torch.minimum(k + 1, length - k)


def windowed_predictor(windows: Sequence[tuple[tuple[int, int], BranchPredictor]], frames: int) -> BranchPredictor:
    """One `BranchPredictor` over clips of `frames` frames from per-window ones: ((start, end), predictor) that
    cover every frame. Each branch's velocity is the `window_weights` blend of the windows' (module docstring).
    A single window is returned as it is, so a clip that fits one window samples exactly as before."""
    covered = torch.zeros(frames)
    for (s, e), _ in windows:
        if not 0 <= s < e <= frames:
            raise ValueError(f"window [{s}, {e}) is not inside a clip of {frames} frames")
        covered[s:e] += window_weights(e - s)
    if bool((covered == 0).any()):
        raise ValueError(f"windows {[w for w, _ in windows]} leave frames of a {frames}-frame clip uncovered")
    if len(windows) == 1 and windows[0][0] == (0, frames):
        return windows[0][1]

    def predict(x: Tensor, t: Tensor, branches) -> list[Tensor]:
        out = [torch.zeros_like(x) for _ in branches]
        for (s, e), window in windows:
            w = window_weights(e - s).to(x).view(1, -1, *([1] * (x.dim() - 2)))
            for total, v in zip(out, window(x[:, s:e], t, branches), strict=True):
                total[:, s:e] += w * v
        norm = covered.to(x).view(1, -1, *([1] * (x.dim() - 2)))
        return [total / norm for total in out]

    return predict


def cycling(predictors: Sequence[BranchPredictor]) -> BranchPredictor:
    """A predictor that answers with predictors[k % len] on its k-th call: with windows planned at different
    offsets, a window boundary at one step is inside a window at the others."""
    calls = itertools.count()
    return lambda x, t, branches: predictors[next(calls) % len(predictors)](x, t, branches)
