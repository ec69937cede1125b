"""End-to-end speed of the embedded main job, and of the synthetic world's renderer.

    .venv/bin/python bench/generate_speed.py [--reps 5]

1. `kinema generate` of one 64 px image (28 steps, CFG) in a fresh process, from process start to
   PNG on disk, with the process's peak RSS; the baseline in the same run is the same request
   served warm in this process, so the ratio is what start-up (imports, weight loading) costs.
2. World renders per second on the fly against reading the same images from the cache.
Writes bench/results/generate_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kinema.eval.report import write_results

RESULTS = Path(__file__).parent / "results"
PROMPT = "a red sphere to the left of a blue cube"


def cold_generate(reps: int) -> tuple[list[float], list[float]]:
    """Wall seconds and peak RSS (MB) of `kinema generate` in a fresh process, `reps` times."""
    kinema = Path(sys.executable).with_name("kinema")
    walls, rss = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(reps):
            out = Path(tmp) / f"{i}.png"
            cmd = [sys.executable, "-c",
                   "import resource, subprocess, sys; "
                   f"r = subprocess.run({[str(kinema), 'generate', PROMPT, '-q', '-o', str(out)]!r}); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - t0)
            if not out.exists():
                raise RuntimeError(f"no PNG written: {proc.stderr}")
            rss.append(int(proc.stdout.strip().splitlines()[-1]) / 1024)
    return walls, rss


def warm_generate(reps: int) -> list[float]:
    from kinema.pipelines import TextToImageRequest, text_to_image
    from kinema.pipelines.local import load_local

    stack = load_local()
    req = TextToImageRequest(prompts=[PROMPT])
    text_to_image(req, *stack)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        text_to_image(req, *stack)
        times.append(time.perf_counter() - t0)
    return times


def render_rates(n: int) -> dict[str, float]:
    from kinema.data import World, cached_images

    world = World()
    t0 = time.perf_counter()
    world.images("val", 0, n)
    on_the_fly = n / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        cached_images(world, "val", n, Path(tmp))
        t0 = time.perf_counter()
        cached_images(world, "val", n, Path(tmp))
        cached = n / (time.perf_counter() - t0)
    return {"renders_per_s": round(on_the_fly, 1), "cached_reads_per_s": round(cached, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--renders", type=int, default=500)
    args = ap.parse_args(argv)
    walls, rss = cold_generate(args.reps)
    warm = warm_generate(args.reps)
    results = {
        "cold_process_to_png_s": round(statistics.median(walls), 2),
        "cold_process_to_png_s_max": round(max(walls), 2),
        "peak_rss_mb": round(max(rss), 1),
        "warm_in_process_s": round(statistics.median(warm), 3),
        "cold_over_warm": round(statistics.median(walls) / statistics.median(warm), 1),
        "targets": {"cold_process_to_png_s": "<= 5", "peak_rss_mb": "<= 1536"},
        "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or "default",
        "load_average": os.getloadavg(),
        **render_rates(args.renders),
    }
    command = "python bench/generate_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for path in write_results(RESULTS / "generate_speed", results, command):
        print(path)


if __name__ == "__main__":
    main()
