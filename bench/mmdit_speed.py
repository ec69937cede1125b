"""CPU fp32 forward speed of kinema's MMDiT against diffusers' SD3Transformer2DModel with the same weights.

    .venv/bin/python bench/mmdit_speed.py [--configs mini small] [--threads N]

For each preset: saves a randomly initialised diffusers model, loads it into ours with
`kinema.nn.sd3_loader`, checks both give the same velocity, then times no-grad forwards of the two
alternately (so load from other processes hits both alike) and reports medians, the speed ratio, our
forward's FLOPs (torch.utils.flop_counter) and the achieved FLOP/s against this CPU's measured fp32
rate for a 2048x2048 matmul. Writes bench/results/mmdit_speed.{json,md}.

Each model is timed in a process of its own that loads it from the same saved diffusers checkpoint the
way its library does (`load_sd3_transformer`, `SD3Transformer2DModel.from_pretrained`), twice: with
glibc's malloc told to keep freed memory ("kept": MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), which
compares the computation alone, and with glibc's defaults ("default"), as a service runs unless tuned.
By default malloc hands large freed blocks back to the OS, after thresholds it adapts to what the
process allocated before, so whether a forward takes thousands of page faults (~1 ms per thousand
here) depends on load order and on what else the process did, and the "default" rows vary from run
to run more than the "kept" ones. Page faults per forward are reported with the times.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import diffusers
import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from kinema.eval.report import cpu_model
from kinema.nn.mmdit import PRESETS, MMDiTParams
from kinema.nn.sd3_loader import diffusers_config_from_params, load_sd3_transformer

RESULTS = Path(__file__).parent / "results"
# Worker environments (see the module docstring): malloc keeping freed memory, and glibc's default.
MALLOC_POLICIES: dict[str, dict[str, str]] = {
    "kept": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)},
    "default": {},
}
# FlopCounterMode has no formula for the CPU flash-attention kernel; it is the same attention as on CUDA.
ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v)
}


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
    """fp32 FLOP/s of an n x n matmul on this CPU (median)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n**3 / (median_ms(lambda: torch.mm(a, b), reps) / 1000)


def make_inputs(p: MMDiTParams, batch: int, tokens: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x, t, context, pooled), the same in every process."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, p.in_channels, p.sample_size, p.sample_size, generator=g)
    t = torch.rand(batch, generator=g)
    ctx = torch.randn(batch, tokens, p.context_dim, generator=g)
    pooled = torch.randn(batch, p.pooled_dim, generator=g)
    return x, t, ctx, pooled


def load_forward(which: str, folder: str, p: MMDiTParams, inputs: tuple) -> Callable[[], Tensor]:
    """One forward of `which` model, loaded from the diffusers checkpoint folder as its library loads one."""
    x, t, ctx, pooled = inputs
    if which == "ours":
        ours = load_sd3_transformer(folder)
        return lambda: ours(x, t, ctx, pooled)
    ref = SD3Transformer2DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    return lambda: ref(x, ctx, pooled, t * p.timestep_scale, return_dict=False)[0]


def serve(conn: Connection, which: str, name: str, folder: str, batch: int, tokens: int, threads: int) -> None:
    """Worker process: load one model; per request, run one no-grad forward and reply (seconds, page faults)."""
    torch.set_num_threads(threads)
    p = PRESETS[name]
    run = load_forward(which, folder, p, make_inputs(p, batch, tokens))
    with torch.inference_mode():
        conn.send("ready")
        while conn.recv():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            run()
            conn.send((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
    conn.close()


def bench_config(name: str, batch: int, tokens: int, reps: int, warmup: int) -> list[dict]:
    """One result per malloc policy (see MALLOC_POLICIES)."""
    p = PRESETS[name]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        SD3Transformer2DModel(**diffusers_config_from_params(p)).save_pretrained(folder)
        inputs = make_inputs(p, batch, tokens)
        run_ours, run_ref = (load_forward(which, folder, p, inputs) for which in ("ours", "diffusers"))
        with torch.inference_mode():
            max_diff = (run_ours() - run_ref()).abs().max().item()
            with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
                run_ours()
        flops = counter.get_total_flops()
        del run_ours, run_ref
        for policy, env in MALLOC_POLICIES.items():
            times, faults = time_in_workers(name, folder, batch, tokens, reps, warmup, env)
            t_ours, t_ref = times["ours"], times["diffusers"]
            ms_ours, ms_ref = statistics.median(t_ours), statistics.median(t_ref)
            results.append(
                {
                    "config": name,
                    "malloc": policy,
                    "malloc_env": env,
                    "params": {k: v for k, v in vars(p).items()},
                    "batch": batch,
                    "text_tokens": tokens,
                    "image_tokens": (p.sample_size // p.patch_size) ** 2,
                    "max_abs_diff_vs_diffusers": max_diff,
                    "ms_ours": ms_ours,
                    "ms_diffusers": ms_ref,
                    "speedup_vs_diffusers": ms_ref / ms_ours,
                    # each rep's two forwards ran back to back: their ratio cancels slow drifts in machine load
                    "speedup_paired_median": statistics.median(r / o for r, o in zip(t_ref, t_ours, strict=True)),
                    "flops_ours": flops,
                    "flops_per_s_ours": flops / (ms_ours / 1000),
                    "min_ms_ours": min(t_ours),
                    "min_ms_diffusers": min(t_ref),
                    "page_faults_per_forward_ours": statistics.median(faults["ours"]),
                    "page_faults_per_forward_diffusers": statistics.median(faults["diffusers"]),
                }
            )
    return results


def time_in_workers(
    name: str, folder: str, batch: int, tokens: int, reps: int, warmup: int, env: dict[str, str]
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Forward times (ms) and page faults of both models, each in its own process, requested alternately."""
    ctx = mp.get_context("spawn")
    workers = {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by glibc when each worker starts
    try:
        for which in ("ours", "diffusers"):
            parent, child = ctx.Pipe()
            args = (child, which, name, folder, batch, tokens, torch.get_num_threads())
            proc = ctx.Process(target=serve, args=args)
            proc.start()
            workers[which] = (proc, parent)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for _, conn in workers.values():
        if conn.recv() != "ready":
            raise RuntimeError(f"{name}: a benchmark worker did not start")
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    faults: dict[str, list[int]] = {"ours": [], "diffusers": []}
    for i in range(warmup + reps):  # alternate, so a busy neighbour slows both alike
        for which, (_, conn) in workers.items():
            conn.send(True)
            seconds, n_faults = conn.recv()
            if i >= warmup:
                times[which].append(1000 * seconds)
                faults[which].append(n_faults)
    for proc, conn in workers.values():
        conn.send(False)
        proc.join()
    return times, faults


def write_markdown(path: Path, report: dict) -> None:
    m = report["machine"]
    rate = report["matmul_fp32_flops_per_s"]
    lines = [
        "# MMDiT forward speed, CPU fp32 (kinema vs diffusers SD3Transformer2DModel)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"diffusers {m['diffusers']}, load average at start {m['loadavg_start']}, at end {m['loadavg_end']}.",
        "",
        f"fp32 2048x2048 matmul on this CPU: {rate / 1e9:.1f} GFLOP/s "
        f"(before the runs {report['matmul_before'] / 1e9:.1f}, after {report['matmul_after'] / 1e9:.1f}).",
        "",
        "| config | malloc | batch | tokens (img+txt) | ours ms | diffusers ms | speed-up | speed-up, paired "
        "| GFLOP/forward | ours GFLOP/s | % of matmul rate | max abs diff | page faults/forward ours, diffusers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['config']} | {r['malloc']} | {r['batch']} | {r['image_tokens']}+{r['text_tokens']} "
            f"| {r['ms_ours']:.1f} | {r['ms_diffusers']:.1f} | {r['speedup_vs_diffusers']:.2f}x "
            f"| {r['speedup_paired_median']:.2f}x | {r['flops_ours'] / 1e9:.2f} "
            f"| {r['flops_per_s_ours'] / 1e9:.1f} | {100 * r['flops_per_s_ours'] / rate:.0f}% "
            f"| {r['max_abs_diff_vs_diffusers']:.1e} "
            f"| {r['page_faults_per_forward_ours']:.0f}, {r['page_faults_per_forward_diffusers']:.0f} |"
        )
    lines += [
        "",
        "Times are medians over alternating no-grad forwards after warm-up, each model in a process of its own "
        "that loaded it from the same diffusers checkpoint; speed-up is the ratio of the medians, 'paired' the "
        "median of each rep's ratio of its two back-to-back forwards. Malloc 'kept' runs the workers with "
        f"{' '.join(f'{k}={v}' for k, v in MALLOC_POLICIES['kept'].items())} (freed memory stays with the process: "
        "the computation alone), 'default' with glibc's defaults (page faults vary with the process's history). "
        "FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on our forward (the same network as "
        "diffusers').",
        "",
        report["note"],
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["mini", "small"], choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="text tokens")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--note", default="", help="free text for the report, e.g. what else ran on the machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg()
    before = matmul_rate()
    results = []
    for name in args.configs:
        for r in bench_config(name, args.batch, args.tokens, args.reps, args.warmup):
            print(
                f"{name} (malloc {r['malloc']}): ours {r['ms_ours']:.1f} ms, diffusers {r['ms_diffusers']:.1f} ms "
                f"({r['speedup_vs_diffusers']:.2f}x), {r['flops_per_s_ours'] / 1e9:.1f} GFLOP/s, page faults/forward "
                f"{r['page_faults_per_forward_ours']:.0f} vs {r['page_faults_per_forward_diffusers']:.0f}",
                flush=True,
            )
            results.append(r)
    after = matmul_rate()
    rate = statistics.median([before, after])
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "loadavg_start": [round(v, 2) for v in load_start],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        },
        "matmul_fp32_flops_per_s": rate,
        "matmul_before": before,
        "matmul_after": after,
        "results": results,
        "note": args.note,
    }
    for r in results:
        r["pct_of_matmul_rate"] = 100 * r["flops_per_s_ours"] / rate
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mmdit_speed.json").write_text(json.dumps(report, indent=2))
    write_markdown(args.out / "mmdit_speed.md", report)
    print(f"matmul {rate / 1e9:.1f} GFLOP/s; wrote {args.out / 'mmdit_speed.md'}")


if __name__ == "__main__":
    main()
