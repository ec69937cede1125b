"""CPU fp32 forward speed of kinema's MMDiT against diffusers' SD3Transformer2DModel with the same weights.

    .venv/bin/python bench/mmdit_speed.py [--configs mini small] [--threads N]

For each preset: builds a randomly initialised diffusers model, converts its weights with
`kinema.nn.sd3_loader`, checks both give the same velocity, then times no-grad forwards of the two
alternately (so load from other processes hits both alike) and reports medians, the speed ratio, our
forward's FLOPs (torch.utils.flop_counter) and the achieved FLOP/s against this CPU's measured fp32
rate for a 2048x2048 matmul. Writes bench/results/mmdit_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from diffusers import SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from kinema.eval.report import cpu_model
from kinema.nn.mmdit import PRESETS
from kinema.nn.sd3_loader import diffusers_config_from_params, mmdit_from_diffusers_state_dict

RESULTS = Path(__file__).parent / "results"
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


def bench_config(name: str, batch: int, tokens: int, reps: int, warmup: int) -> dict:
    p = PRESETS[name]
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**diffusers_config_from_params(p)).eval()
    ours = mmdit_from_diffusers_state_dict(ref.state_dict(), p)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, p.in_channels, p.sample_size, p.sample_size, generator=g)
    t = torch.rand(batch, generator=g)
    ctx = torch.randn(batch, tokens, p.context_dim, generator=g)
    pooled = torch.randn(batch, p.pooled_dim, generator=g)

    run_ours = lambda: ours(x, t, ctx, pooled)
    run_ref = lambda: ref(x, ctx, pooled, t * p.timestep_scale, return_dict=False)[0]
    with torch.inference_mode():
        max_diff = (run_ours() - run_ref()).abs().max().item()
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            run_ours()
        flops = counter.get_total_flops()
        for _ in range(warmup):
            run_ours(), run_ref()
        t_ours, t_ref = [], []
        for _ in range(reps):  # alternate, so a busy neighbour slows both alike
            t_ours.append(median_ms(run_ours, 1))
            t_ref.append(median_ms(run_ref, 1))
    ms_ours, ms_ref = statistics.median(t_ours), statistics.median(t_ref)
    return {
        "config": name,
        "params": {k: v for k, v in vars(p).items()},
        "batch": batch,
        "text_tokens": tokens,
        "image_tokens": (p.sample_size // p.patch_size) ** 2,
        "max_abs_diff_vs_diffusers": max_diff,
        "ms_ours": ms_ours,
        "ms_diffusers": ms_ref,
        "speedup_vs_diffusers": ms_ref / ms_ours,
        "flops_ours": flops,
        "flops_per_s_ours": flops / (ms_ours / 1000),
        "min_ms_ours": min(t_ours),
        "min_ms_diffusers": min(t_ref),
    }


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
        "| config | batch | tokens (img+txt) | ours ms | diffusers ms | speed-up | GFLOP/forward | ours GFLOP/s "
        "| % of matmul rate | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['image_tokens']}+{r['text_tokens']} | {r['ms_ours']:.1f} "
            f"| {r['ms_diffusers']:.1f} | {r['speedup_vs_diffusers']:.2f}x | {r['flops_ours'] / 1e9:.2f} "
            f"| {r['flops_per_s_ours'] / 1e9:.1f} | {100 * r['flops_per_s_ours'] / rate:.0f}% "
            f"| {r['max_abs_diff_vs_diffusers']:.1e} |"
        )
    lines += [
        "",
        "Times are medians over alternating no-grad forwards after warm-up; FLOPs are counted by "
        "`torch.utils.flop_counter.FlopCounterMode` on our forward (the same network as diffusers').",
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
        r = bench_config(name, args.batch, args.tokens, args.reps, args.warmup)
        print(
            f"{name}: ours {r['ms_ours']:.1f} ms, diffusers {r['ms_diffusers']:.1f} ms "
            f"({r['speedup_vs_diffusers']:.2f}x), {r['flops_per_s_ours'] / 1e9:.1f} GFLOP/s, "
            f"max diff {r['max_abs_diff_vs_diffusers']:.1e}",
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
