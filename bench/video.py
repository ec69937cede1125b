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
- seams: long clips (`--long` frames) in windows of `--window` frames sampled together (velocities blended where
  they overlap, window plans cycling step by step: `kinema.sampling.windows`) at overlap 0, 2 and 4:
  consecutive-frame difference across window boundaries over the mean of the other pairs; 1 means a boundary looks
  like any other pair of frames, and the input clip's own ratio at the same pairs is the floor.
- cost: wall time of one 8-frame clip at `--steps` steps, and peak resident memory of a fresh process editing clips of
  8..64 frames (`--memory-steps` steps: memory does not depend on the step count).

Writes bench/results/video.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("structure", "consistency", "seams", "cost")
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


def seams(nets, world, clips: int, frames: int, window: int, steps: int, overlaps: tuple[int, ...]) -> dict:
    """Consecutive-frame difference across window boundaries over the mean elsewhere, per overlap, averaged over
    `clips` long test clips; the input clips' own ratio at the same pairs is the motion's floor. The boundaries are
    those of `plan_windows` (offset 0: where windows sampled apart would meet); the steps also cycle through the
    plans shifted by 1..stride-1 frames (`kinema.sampling.windows.window_plans`). The largest pair over the median
    pair, output and input, catches a jump anywhere else."""
    from kinema.pipelines.edit_video import EditVideoRequest, edit_video
    from kinema.sampling.windows import plan_windows, window_plans

    def pair_diffs(frames: np.ndarray) -> np.ndarray:
        x = frames.astype(np.float32) / 255
        return ((x[1:] - x[:-1]) ** 2).mean(axis=(1, 2, 3))  # (F-1,): pair i = frames i, i+1

    def ratio(diffs: np.ndarray, boundary: list[int]) -> float:
        inside = [d for i, d in enumerate(diffs) if i not in boundary]
        return float(np.mean(diffs[boundary]) / np.mean(inside))

    def mean(values: list[float]) -> float:
        return round(float(np.mean(values)), 2)

    out: dict = {}
    for overlap in overlaps:
        windows = plan_windows(frames, window, overlap)
        # a window's new frames start where the one before it ends: the pair across that boundary
        boundary = sorted({e0 - 1 for (_, e0) in windows[:-1]})
        got_ratios, input_ratios, got_peaks, input_peaks = [], [], [], []
        for k in range(clips):
            clip = world.clip("test", 1000 + k, frames)
            rgb = to_uint8(clip.rgb)
            request = EditVideoRequest(prompt=clip.caption, steps=steps, window=window, overlap=overlap, seed=k)
            got: list[np.ndarray] = []
            edit_video(request, lambda rgb=rgb: iter(rgb), got.append, *nets)
            got_diffs, input_diffs = pair_diffs(np.stack(got)), pair_diffs(rgb)
            got_ratios.append(ratio(got_diffs, boundary))
            input_ratios.append(ratio(input_diffs, boundary))
            got_peaks.append(float(got_diffs.max() / np.median(got_diffs)))
            input_peaks.append(float(input_diffs.max() / np.median(input_diffs)))
        out[f"overlap={overlap}"] = {"boundary_over_interior": mean(got_ratios),
                                     "input_at_the_same_pairs": mean(input_ratios),
                                     "largest_pair_over_median": mean(got_peaks), "input_largest_over_median":
                                     mean(input_peaks), "windows": len(windows),
                                     "plans": len(window_plans(frames, window, overlap)),
                                     "boundary_pairs": boundary}  # fmt: skip
        print(json.dumps({f"seams overlap={overlap}": out[f"overlap={overlap}"]}), flush=True)
    return out


def peak_memory(frames_list: list[int], steps: int, threads: int) -> dict[str, float]:
    """Peak RSS (MiB, the kernel's VmHWM) of a fresh `kinema edit-video` process per clip length (the CLI, as a user
    runs it)."""
    from kinema.data import World
    from kinema.storage.video import write_video

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        longest = max(frames_list)
        clip = to_uint8(World().clip("test", 2000, longest).rgb)
        for n in frames_list:
            src = Path(tmp) / f"in{n}.mp4"
            write_video(src, clip[:n], fps=8)
            # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report this process's peak
            code = ("import re, sys; from kinema.cli import main; import torch; "
                    f"torch.set_num_threads({threads}); rc = main(sys.argv[1:]); "
                    "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
                    "print('PEAK', hwm); sys.exit(rc)")  # fmt: skip
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
    ap.add_argument("--long", type=int, default=26, help="frames of the seam clips")
    ap.add_argument("--seam-clips", type=int, default=4, help="long clips the seam ratios average over")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated parts to run; the others keep their values from --out's JSON")  # fmt: skip
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

    sections = set(args.sections.split(","))
    if "structure" in sections:
        floor = [structure_error(depth_net, to_uint8(c.rgb), c.depth) for c, _, _ in tasks]
        results["structure"] = {"input": round(float(np.mean(floor)), 4)}
        for t_s in T_S:
            errors, adherence = [], []
            for i, (clip, prompt, truth) in enumerate(tasks):
                frames, _ = run(clip, prompt, i, t_s, 1.0)
                errors.append(structure_error(depth_net, frames, clip.depth))
                adherence.append(evaluate(probe, frames, [truth] * len(frames))["colour_shape"])
            results["structure"][f"t_s={t_s:g}"] = {"depth_absrel": round(float(np.mean(errors)), 4),
                                                    "colour_shape": round(float(np.mean(adherence)), 3)}  # fmt: skip
            print(json.dumps({f"t_s={t_s:g}": results["structure"][f"t_s={t_s:g}"]}), flush=True)
    if "consistency" in sections:
        results["consistency"] = {"ground_truth": mean_rows([consistency(to_uint8(c.rgb), c, perceptual)
                                                             for c, _, _ in tasks])}  # fmt: skip
        for w in OMEGA_T:
            rows, adherence = [], []
            for i, (clip, prompt, truth) in enumerate(tasks):
                frames, _ = run(clip, prompt, i, 0.0, w)
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
    if "seams" in sections:
        results["seams"] = seams(nets, world, args.seam_clips, args.long, args.window, args.steps, (0, 2, 4))
    if "cost" in sections:
        clip, prompt, _ = tasks[0]
        seconds = [run(clip, prompt, 0, 0.0, 1.0)[1] for _ in range(3)]
        results["cost"] = {
            "seconds_per_clip_median_of_3": round(float(np.median(seconds)), 2),
            "clip": f"{args.frames} frames, 64 px, {args.steps} steps, CFG {args.guidance:g} + omega_t "
            "1 (3 network evaluations a step)",
            "peak_rss_mib_by_clip_length": peak_memory(
                args.memory_frames, args.memory_steps, args.threads or torch.get_num_threads()
            ),
        }
    command = "python bench/video.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    previous = args.out.with_name(args.out.name + ".json")
    if sections != {"structure", "consistency", "seams", "cost"} and previous.exists():
        # a partial run updates its sections and keeps the others, each with the command that made it
        old = json.loads(previous.read_text())
        commands = old["results"].get("commands", {s: old["command"] for s in old["results"] if s in SECTIONS})
        results = old["results"] | {k: v for k, v in results.items() if k in sections or k == "models"}
        results["commands"] = commands | dict.fromkeys(sections, command)
    print(write_results(args.out, results, command))


if __name__ == "__main__":
    main()
