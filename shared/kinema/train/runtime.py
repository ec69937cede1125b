"""Where and how long a training run runs: the command-line options both trainers share."""

from __future__ import annotations

import argparse

import torch


def add_runtime_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default; 1 when cores are shared)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when one is visible)")
    ap.add_argument("--amp", action="store_true",
                    help="bf16 autocast for forward passes on CUDA (fp32 weights); ignored on a CPU")  # fmt: skip
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="end the run after this much training time, whatever --steps says")  # fmt: skip
    ap.add_argument("--workers", type=int, default=1, help="processes that render the training scenes")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="steps between resumable checkpoints")


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device the options name; a clear error when CUDA is asked for and absent."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device (use --device cpu or auto)")
    if args.amp and device.type != "cuda":  # bf16 is far slower than fp32 on a CPU
        print("--amp ignored: training in fp32 on the CPU", flush=True)
        args.amp = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device
