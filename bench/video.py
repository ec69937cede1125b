"""Gen-1 video editing on held-out synthetic clips: structure fidelity against t_s, temporal consistency against
omega_t, prompt adherence, seams between windows, time and peak memory against clip length.

    .venv/bin/python bench/video.py [--clips 8] [--frames 8] [--steps 28] [--threads 2]

Every clip of the world's test split is edited by `kinema.pipelines.edit_video` (the embedded pipeline, shipped
models) with a prompt that recolours its objects (same shapes, same layout: the structure should stay, the colours
should change), seed = clip index, CFG 4. Measured on the decoded frames:

- structure (rows `t_s=...`, omega_t 1): disparity the shipped depth network estimates on the output, aligned per
  frame in scale and shift to the input's exact disparity (MiDaS), AbsRel against it; 0 = the input's geometry.
  Should rise with t_s. The same metric on the input frames themselves is the floor (`input`).
- consistency (rows `omega_t=...`, t_s 0): mean squared difference of consecutive frames, warp error against the
  world's exact motion (`kinema.train.video.warp_error`: frame t+1 warped back to t, occlusions left out) and an
  EfficientNet-Lite0 feature distance between consecutive frames (`kinema.train.perceptual`). omega_t = 0 samples
  every frame as an image: it is the baseline the others are compared with (ratio columns). Lower is steadier; the
  input clip's own values are the motion floor (`ground_truth`).
- adherence: the attribute probe on every output frame against the recoloured objects (colour+shape found).
- seams: one long clip (`--long` frames) in windows of `--window` frames, overlap 2 (shared noise, blended) and
  overlap 0 (windows side by side): consecutive-frame difference across window boundaries over the mean within
  windows; 1 means a boundary looks like any other pair of frames.
- cost: wall time of one 8-frame clip at `--steps` steps, and peak resident memory of a fresh process editing clips of
  8..64 frames (`--memory-steps` steps: memory does not depend on the step count).

Writes bench/results/video.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
OMEGA_T = (0.0, 0.5, 1.0, 1.5, 2.0)
T_S = (0.0, 0.25, 0.5, 0.75, 1.0)


def recoloured(scene, rng: np.random.Generator):
    """The scene with every object's colour changed to one the scene does not have (distinct colours kept)."""
    from kinema.data.scene import COLOUR_NAMES

    free = [c for c in COLOUR_NAMES if c not in {o.colour for o in scene.objects}]
    new = rng.choice(free, size=len(scene.objects), replace=False)
    return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, colour=str(c))
                                                    for o, c in zip(scene.objects, new, strict=True)))  # fmt: skip


def edit_task(world, index: int, frames: int):
    """(clip, edit prompt, probe truth) for test clip `index`."""
    from kinema.data.scene import caption
    from kinema.eval.scoring import Truth

    clip = world.clip("test", index, frames)
    scene = recoloured(world.scene("test", index), np.random.default_rng(index))
    fov = world.params.fov_deg
    truth = Truth(tuple((o.colour, o.shape) for o in (scene.objects[i] for i in _order(scene, fov))))
    return clip, caption(scene, fov), truth


def _order(scene, fov):
    from kinema.data.scene import left_to_right

    return left_to_right(scene, fov)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(rgb * 255).astype(np.uint8)


def structure_error(depth_net, frames: np.ndarray, exact_depth: np.ndarray) -> float:
    """AbsRel of the depth network's disparity on `frames` (F, H, W, 3) uint8, aligned per frame in scale and shift
    to the exact disparity 1 / depth (F, H, W)."""
    from kinema.nn.depth import align_scale_shift, estimate

    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.inference_mode():
        pred = estimate(depth_net, pixels)[:, 0]  # (F, H, W)
    target = torch.from_numpy(1.0 / np.maximum(exact_depth, 1e-6)).float()
    s, t = align_scale_shift(pred, target)
    aligned = s[:, None, None] * pred + t[:, None, None]
    return float(((aligned - target).abs() / target).mean())


def consistency(frames: np.ndarray, clip, perceptual) -> dict[str, float]:
    from kinema.train.video import warp_error

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)
    with torch.inference_mode():
        feature = perceptual(x[:-1] * 2 - 1, x[1:] * 2 - 1).mean()
    return {
        "frame_diff": float((x[1:] - x[:-1]).pow(2).mean()),
        "warp_error": warp_error(x[None], clip.flow[None], clip.instances[None]),
        "feature_distance": float(feature),
    }


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.mean([r[k] for r in rows])), 5) for k in rows[0]}


def seams(nets, world, frames: int, window: int, steps: int) -> dict:
    """Consecutive-frame difference at window boundaries over the mean within windows, with and without overlap."""
    from kinema.pipelines.edit_video import EditVideoRequest, edit_video, plan_windows

    clip = world.clip("test", 1000, frames)
    rgb = to_uint8(clip.rgb)
    out = {}
    for overlap in (2, 0):
        request = EditVideoRequest(prompt=world.clip("test", 1000, 1).caption, steps=steps, window=window,
                                   overlap=overlap, seed=1)  # fmt: skip
        got: list[np.ndarray] = []
        edit_video(request, lambda: iter(rgb), got.append, *nets)
        x = np.stack(got).astype(np.float32) / 255
        diffs = ((x[1:] - x[:-1]) ** 2).mean(axis=(1, 2, 3))  # (F-1,): pair i = frames i, i+1
        windows = plan_windows(frames, window, overlap)
        # a window's new frames start where the one before it ends: the pair across that boundary
        boundary = sorted({e0 - 1 for (_, e0) in windows[:-1]})
        inside = [d for i, d in enumerate(diffs) if i not in boundary]
        ratio = float(np.mean(diffs[boundary]) / np.mean(inside))
        out[f"overlap={overlap}"] = {"boundary_over_interior": round(ratio, 3), "boundary_pairs": boundary,
                                     "windows": windows}  # fmt: skip
    return out


def peak_memory(frames_list: list[int], steps: int, threads: int) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh `kinema edit-video` process per clip length (the CLI, as a user runs it)."""
    from kinema.data import World
    from kinema.storage.video import write_video

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        longest = max(frames_list)
        clip = to_uint8(World().clip("test", 2000, longest).rgb)
        for n in frames_list:
            src = Path(tmp) / f"in{n}.mp4"
            write_video(src, clip[:n], fps=8)
            code = ("import resource, sys; from kinema.cli import main; import torch; "
                    f"torch.set_num_threads({threads}); rc = main(sys.argv[1:]); "
                    "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")  # fmt: skip
            cmd = [sys.executable, "-c", code, "edit-video", str(src), "--prompt", "a red sphere", "--steps",
                   str(steps), "-o", str(Path(tmp) / f"out{n}.mp4"), "-q"]  # fmt: skip
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peak = next(int(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("PEAK"))
            out[f"{n} frames"] = round(peak / 1024, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=8, help="held-out test clips per row")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--long", type=int, default=26, help="frames of the seam clip")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--memory-frames", type=int, nargs="*", default=[8, 16, 32, 64])
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "video")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kinema.data import World
    from kinema.eval.probe import Probe
    from kinema.eval.report import write_results
    from kinema.eval.scoring import evaluate
    from kinema.pipelines.edit_video import EditVideoRequest, edit_video
    from kinema.pipelines.local import load_local_video
    from kinema.train.perceptual import PerceptualLoss

    nets = load_local_video()
    depth_net = nets[1].model
    perceptual = PerceptualLoss()
    probe = Probe.from_file()
    world = World()
    tasks = [edit_task(world, i, args.frames) for i in range(args.clips)]
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
                     "models": nets[2].fingerprint()[:12]}  # fmt: skip

    def run(clip, prompt, seed, structure, omega_t) -> tuple[np.ndarray, float]:
        request = EditVideoRequest(prompt=prompt, structure=structure, temporal_guidance=omega_t,
                                   guidance=args.guidance, steps=args.steps, window=args.window, seed=seed)  # fmt: skip
        got: list[np.ndarray] = []
        t0 = time.perf_counter()
        edit_video(request, lambda: iter(to_uint8(clip.rgb)), got.append, *nets)
        return np.stack(got), time.perf_counter() - t0

    floor = [structure_error(depth_net, to_uint8(c.rgb), c.depth) for c, _, _ in tasks]
    results["structure"] = {"input": round(float(np.mean(floor)), 4)}
    seconds = []
    for t_s in T_S:
        errors, adherence = [], []
        for i, (clip, prompt, truth) in enumerate(tasks):
            frames, sec = run(clip, prompt, i, t_s, 1.0)
            seconds.append(sec)
            errors.append(structure_error(depth_net, frames, clip.depth))
            adherence.append(evaluate(probe, frames, [truth] * len(frames))["colour_shape"])
        results["structure"][f"t_s={t_s:g}"] = {"depth_absrel": round(float(np.mean(errors)), 4),
                                                "colour_shape": round(float(np.mean(adherence)), 3)}  # fmt: skip
        print(json.dumps({f"t_s={t_s:g}": results["structure"][f"t_s={t_s:g}"]}), flush=True)
    results["consistency"] = {"ground_truth": mean_rows([consistency(to_uint8(c.rgb), c, perceptual)
                                                         for c, _, _ in tasks])}  # fmt: skip
    for w in OMEGA_T:
        rows, adherence = [], []
        for i, (clip, prompt, truth) in enumerate(tasks):
            frames, sec = run(clip, prompt, i, 0.0, w)
            rows.append(consistency(frames, clip, perceptual))
            adherence.append(evaluate(probe, frames, [truth] * len(frames))["colour_shape"])
        row = mean_rows(rows) | {"colour_shape": round(float(np.mean(adherence)), 3)}
        results["consistency"][f"omega_t={w:g}"] = row
        print(json.dumps({f"omega_t={w:g}": row}), flush=True)
    base = results["consistency"]["omega_t=0"]
    for w in OMEGA_T[1:]:
        row = results["consistency"][f"omega_t={w:g}"]
        row["warp_error_vs_frame_wise"] = round(row["warp_error"] / base["warp_error"], 3)
        row["feature_distance_vs_frame_wise"] = round(row["feature_distance"] / base["feature_distance"], 3)
    results["seams"] = seams(nets, world, args.long, args.window, args.steps)
    print(json.dumps({"seams": results["seams"]}), flush=True)
    results["cost"] = {"seconds_per_clip_median": round(float(np.median(seconds)), 2),
                       "clip": f"{args.frames} frames, 64 px, {args.steps} steps, CFG {args.guidance:g} + omega_t 1 "
                               "(3 network evaluations a step)",
                       "peak_rss_mib_by_clip_length": peak_memory(args.memory_frames, args.memory_steps,
                                                                  args.threads or torch.get_num_threads()),
                       "this_process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                                          1)}  # fmt: skip
    command = "python bench/video.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(write_results(args.out, results, command))


if __name__ == "__main__":
    main()
