"""GPU forward latency of kinema's MMDiT against diffusers' SD3Transformer2DModel at SD3-medium scale.

    .venv/bin/python bench/mmdit_gpu.py [--preset sd3-medium] [--compile] [--batch 1]

Random weights (diffusers' init, converted to ours with `kinema.nn.sd3_loader`; our own init and
no diffusers row where diffusers is not installed or `--no-diffusers`), bf16, a 1024 px
image (128x128x16 latent, 4096 image tokens) and 333 text tokens (SD3's 77 CLIP + 256 T5), SDPA
attention in both. Reports per-step latency (median of CUDA-event timings), our forward's FLOPs and
the achieved FLOP/s against a measured bf16 8192^3 matmul on the same device. Needs CUDA and says so
otherwise (`--device cpu` exists only to smoke-test this script with a small preset).
Writes bench/results/mmdit_gpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from kinema.nn.mmdit import PRESETS, MMDiT
from kinema.nn.sd3_loader import diffusers_config_from_params, mmdit_from_diffusers_state_dict

RESULTS = Path(__file__).parent / "results"
# FlopCounterMode has no formula for the CPU flash-attention kernel; it is the same attention as on CUDA.
ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v)
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def median_ms(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    return 2 * n**3 / (median_ms(lambda: torch.mm(a, b), reps, device) / 1000)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd3-medium", choices=list(PRESETS))
    parser.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024 px at f=8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=333, help="text tokens")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-diffusers", action="store_true", help="time kinema's MMDiT alone")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"bench/mmdit_gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none "
            "(torch.cuda.is_available() is False). Use bench/mmdit_speed.py for the CPU comparison."
        )
    dtype = DTYPES[args.dtype]
    p = PRESETS[args.preset]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    diffusers = None
    if not args.no_diffusers:
        try:
            import diffusers
        except ImportError as e:
            print(f"diffusers unavailable ({e}); timing kinema's MMDiT alone", file=sys.stderr)
    torch.manual_seed(0)
    ref = None
    if diffusers is not None:
        with torch.device(device):
            ref = diffusers.SD3Transformer2DModel(**diffusers_config_from_params(p)).to(dtype).eval()
        ours = mmdit_from_diffusers_state_dict(ref.state_dict(), p)
    else:
        with torch.device(device):
            ours = MMDiT(p).to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, p.in_channels, args.latent, args.latent, device=device, dtype=dtype, generator=g)
    t = torch.rand(args.batch, device=device, generator=g)
    ctx = torch.randn(args.batch, args.tokens, p.context_dim, device=device, dtype=dtype, generator=g)
    pooled = torch.randn(args.batch, p.pooled_dim, device=device, dtype=dtype, generator=g)

    with torch.inference_mode():
        rel_err = None
        if ref is not None:
            expected = ref(x, ctx, pooled, t * p.timestep_scale, return_dict=False)[0].float()
            got = ours(x, t, ctx, pooled).float()
            rel_err = ((got - expected).norm() / expected.norm()).item()
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            ours(x, t, ctx, pooled)
        flops = counter.get_total_flops()

        run_ours, run_ref = ours, ref
        if args.compile:
            run_ours = torch.compile(ours)
            run_ref = torch.compile(ref) if ref is not None else None
        step_ours = lambda: run_ours(x, t, ctx, pooled)
        step_ref = lambda: run_ref(x, ctx, pooled, t * p.timestep_scale, return_dict=False)
        for _ in range(args.warmup):
            step_ours()
            if ref is not None:
                step_ref()
        ms_ours = median_ms(step_ours, args.reps, device)
        ms_ref = median_ms(step_ref, args.reps, device) if ref is not None else None
    rate = matmul_rate(device, dtype, 8192 if device.type == "cuda" else 1024)

    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": device_name,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__ if diffusers is not None else None,
        "preset": args.preset,
        "dtype": args.dtype,
        "compile": args.compile,
        "batch": args.batch,
        "image_tokens": (args.latent // p.patch_size) ** 2,
        "text_tokens": args.tokens,
        "rel_err_vs_diffusers": rel_err,
        "ms_ours": ms_ours,
        "ms_diffusers": ms_ref,
        "speedup_vs_diffusers": ms_ref / ms_ours if ms_ref else None,
        "flops_per_step": flops,
        "flops_per_s_ours": flops / (ms_ours / 1000),
        "flops_per_s_diffusers": flops / (ms_ref / 1000) if ms_ref else None,
        "matmul_flops_per_s": rate,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mmdit_gpu.json").write_text(json.dumps(report, indent=2))
    pct = 100 * report["flops_per_s_ours"] / rate
    versions = f"torch {torch.__version__}" + (f", diffusers {diffusers.__version__}" if diffusers else "")
    md = [
        f"# MMDiT step latency on {device_name} ({args.preset}, {args.dtype}, compile={args.compile})",
        "",
        f"Command: `{report['command']}`  ({versions})",
        "",
        "| network | ms/step | TFLOP/s | % of matmul rate |",
        "| --- | --- | --- | --- |",
        f"| kinema MMDiT | {ms_ours:.2f} | {report['flops_per_s_ours'] / 1e12:.1f} | {pct:.0f}% |",
    ]
    if ms_ref is not None:
        md.append(
            f"| diffusers SD3Transformer2DModel | {ms_ref:.2f} | {report['flops_per_s_diffusers'] / 1e12:.1f} "
            f"| {100 * report['flops_per_s_diffusers'] / rate:.0f}% |"
        )
    summary = (
        f"batch {args.batch}, {report['image_tokens']} image + {args.tokens} text tokens, "
        f"{flops / 1e12:.2f} TFLOP/step, {args.dtype} {8192 if device.type == 'cuda' else 1024}^3 matmul rate "
        f"{rate / 1e12:.1f} TFLOP/s"
    )
    if rel_err is not None:
        summary += f", relative error vs diffusers {rel_err:.1e}, speed-up {report['speedup_vs_diffusers']:.2f}x"
    md += ["", summary + ".", ""]
    (args.out / "mmdit_gpu.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
