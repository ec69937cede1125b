"""The distributed shape end to end against the embedded one, in one run; then job throughput.

    .venv/bin/python bench/e2e.py [--samples 15] [--starts 1] [--window 60] [--concurrency 1 4 16]

Starts the local stack (`kinema.stack.up`: redis, S3, Triton, the model services, a Celery worker, the orchestrator)
over a model repository whose denoiser is the 'mini' MMDiT (6 x 256, random weights, seed 0: the issue's size) beside
every other model the stack serves (the shipped ones), then:

1. text -> image, one 64 px image, 28 steps with CFG: `Orchestrator.Generate` (gRPC stream until the stored result)
   against `kinema.pipelines.text_to_image` in this process over the same repository plus the PNG encoding,
   `samples` pairs, each run back to back in alternating order: the ratio is the median per-pair ratio, with its
   quartiles (bench/serving.py `rotated`: the machine's drifting speed cancels within a pair). The embedded side gets
   the torch thread count of one Triton instance (config.pbtxt), the compute each network call gets in the stack.
   The served PNG is downloaded through its presigned URL and compared with the embedded image pixel by pixel.
   With `starts` > 1 the pairs run on that many fresh stacks (each started, measured and stopped in turn) and are
   pooled: the same code measured 1.090x, 1.126x and 1.134x from one stack start to the next (docs/serving.md), so
   one start's median is not the code's. Each start's own median is listed too.
2. jobs completed per minute with 1, 4 and 16 clients (on the last stack), each submitting a job (the same request, a
   seed of its own) and watching it to the end, then the next, for `window` seconds (jobs still running then are
   waited for and counted); with the submit-to-completed latency.
Writes bench/results/e2e.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

from kinema.eval.report import write_results
from kinema.inference.model_config import parameters, read_config
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from kinema.pipelines import TextToImageRequest, text_to_image
from kinema.pipelines.local import load_local
from kinema.repository import default_models_dir
from kinema.rpc.process import SERVED_MODELS
from kinema.stack import StackSettings, down, up

sys.path.insert(0, str(Path(__file__).parent))
from serving import mini_repository, relative, rotated  # bench/serving.py: the same mini denoiser

RESULTS = Path(__file__).parent / "results"
PROMPT = "a small red sphere to the left of a blue cube"
STEPS, GUIDANCE, SIZE = 28, 4.0, 64


def stack_repository(root: Path) -> Path:
    """Every shipped model the stack serves, with the mini denoiser in place of the shipped one."""
    for name in SERVED_MODELS:
        if name != "denoiser":
            shutil.copytree(default_models_dir() / name, root / name)
    repo, _ = mini_repository(root)
    return repo


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)  # (H, W, 3)


def png_bytes(image) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def request(seed: int, steps: int = STEPS) -> pb.PipelineRequest:
    return pb.PipelineRequest(pipeline="text_to_image", prompts=[PROMPT], seed=seed, steps=steps, guidance=GUIDANCE,
                              width=SIZE, height=SIZE)  # fmt: skip


def generate_vs_embedded(stub: pb_grpc.OrchestratorStub, repo: Path, samples: int) -> dict:
    """`samples` alternating pairs on one stack: their times (s), and the served PNG checked against the embedded."""
    threads = int(parameters(read_config(repo / "denoiser")).get("torch_threads", "0"))
    if threads:
        torch.set_num_threads(threads)
    text_encoder, denoiser, autoencoder = load_local(repo)
    local = TextToImageRequest(prompts=[PROMPT], seed=0, steps=STEPS, guidance=GUIDANCE, size=SIZE)

    def served() -> pb.Output:
        events = list(stub.Generate(pb.GenerateRequest(request=request(0)), timeout=600))
        return events[-1].result.outputs[0]

    def embedded() -> bytes:
        return png_bytes(text_to_image(local, text_encoder, denoiser, autoencoder).images[0])

    output, mine = served(), embedded()
    theirs = urllib.request.urlopen(output.presigned_url, timeout=60).read()
    assert hashlib.sha256(theirs).hexdigest() == output.artifact.sha256
    diff = np.abs(pixels(theirs) - pixels(mine))
    times = rotated({"a": served, "b": embedded}, samples, warmup=1)
    return {"served_s": times["a"], "embedded_s": times["b"], "identical_png": theirs == mine,
            "max_abs_pixel_diff": int(diff.max()), "pixels_differing": int((diff > 0).any(axis=-1).sum()),
            "pixels": int(diff.shape[0] * diff.shape[1]),
            "torch_threads_embedded": torch.get_num_threads()}  # fmt: skip


def pooled(starts: list[dict]) -> dict:
    """The pairs of every stack start together (`relative`), each start's median ratio, and the PNG checks of all."""
    served = [t for s in starts for t in s["served_s"]]
    embedded = [t for s in starts for t in s["embedded_s"]]
    p = relative(served, embedded)
    return {"served_ms": p["a_ms"], "embedded_ms": p["b_ms"], "ratio": p["ratio"], "ratio_q25": p["ratio_q25"],
            "ratio_q75": p["ratio_q75"], "pairs": p["pairs"], "stack_starts": len(starts),
            "ratio_per_start": [round(relative(s["served_s"], s["embedded_s"])["ratio"], 3) for s in starts],
            "identical_png": all(s["identical_png"] for s in starts),
            "max_abs_pixel_diff": max(s["max_abs_pixel_diff"] for s in starts),
            "pixels_differing": max(s["pixels_differing"] for s in starts), "pixels": starts[0]["pixels"],
            "torch_threads_embedded": starts[0]["torch_threads_embedded"]}  # fmt: skip


def job_throughput(stub: pb_grpc.OrchestratorStub, clients: int, window: float, steps: int) -> dict:
    """Jobs completed per minute with `clients` submitters that each keep one job in flight for `window` s."""
    latencies: list[float] = []
    failed: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def client(c: int) -> None:
        i = 0
        while time.perf_counter() - start < window:
            t0 = time.perf_counter()
            job = stub.SubmitJob(pb.SubmitJobRequest(request=request(10_000 * c + i, steps)), timeout=60).job
            *_, last = (r.job for r in stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=600))
            with lock:
                if last.state == pb.JOB_STATE_COMPLETED:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failed.append(f"{job.id}: {pb.JobState.Name(last.state)} {last.error.message}")
            i += 1

    workers = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"clients": clients, "completed": len(latencies), "failed": len(failed), "seconds": elapsed,
            "jobs_per_minute": 60 * len(latencies) / elapsed, "latency_p50_s": statistics.median(latencies),
            "latency_max_s": latencies[-1], "failures": failed[:5]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=15, help="pairs of Generate calls on each stack start")
    ap.add_argument("--starts", type=int, default=1, help="fresh stacks the pairs run on, pooled")
    ap.add_argument("--window", type=float, default=60.0, help="seconds each concurrency level submits for")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16], help="none: only the Generate part")
    ap.add_argument("--job-steps", type=int, default=STEPS, help="sampling steps of each throughput job")
    ap.add_argument("--out", type=Path, default=RESULTS / "e2e")
    ap.add_argument("--note", default="", help="recorded with the results (e.g. what else ran on the machine)")
    args = ap.parse_args(argv)
    if args.starts < 1 or args.samples < 1:
        ap.error("--starts and --samples must be at least 1")

    results: dict = {"config": {"size": SIZE, "steps": STEPS, "guidance": GUIDANCE, "denoiser": "mini (6 x 256)",
                                "job_steps": args.job_steps}}  # fmt: skip
    starts = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = stack_repository(Path(tmp) / "models")
        for start in range(args.starts):
            run_dir = Path(tmp) / f"stack-{start}"
            state = up(StackSettings(run_dir=run_dir, port=0, models=repo), report=lambda line: print(line, flush=True))
            try:
                with grpc.insecure_channel(state.orchestrator) as channel:
                    stub = pb_grpc.OrchestratorStub(channel)
                    starts.append(generate_vs_embedded(stub, repo, args.samples))
                    results["generate"] = pooled(starts)
                    print(f"generate, after {start + 1} stack start(s):", results["generate"], flush=True)
                    if start + 1 < args.starts:
                        continue
                    for n in args.concurrency:  # on the last stack
                        results[f"jobs_{n}_clients"] = job_throughput(stub, n, args.window, args.job_steps)
                        print(f"{n} clients:", results[f"jobs_{n}_clients"], flush=True)
            finally:
                down(run_dir)
    results["worker_concurrency"] = StackSettings().worker_concurrency
    if args.note:
        results["note"] = args.note
    command = "python bench/e2e.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for path in write_results(args.out, results, command):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
