"""Served against in-process, in one run: per-call overhead, a whole Sample, dynamic batching.

    .venv/bin/python bench/serving.py [--reps 200] [--samples 21] [--clients 8]

Starts a real Triton over models/ and the denoiser service (Triton backend) as processes, then:
1. per network call: `TritonRunner.infer` (KServe v2 over gRPC) against the same network called in
   this process (`LocalRunner`, the very class Triton's model.py runs), `reps` pairs;
2. a full 28-step CFG Sample, for the shipped (tiny) denoiser and at the mini size (6 x 256, random
   weights), through the denoiser service (gRPC stream, one Triton
   call per step) against the embedded loop (`LocalDenoiser`) on the same inputs, `samples` rounds;
3. in the same rounds, the Sample on a copy of the denoiser whose instances are left to the OS (`pin_cpus` false),
   against the denoiser as configured (each instance on a core of its own, kinema.inference.triton_python.pinned_cpus),
   and the service's loop run in this process over a `TritonRunner`: with Triton's statistics, where a served step's
   time goes (`step_breakdown`);
4. dynamic batching: images/s with `clients` concurrent Sample streams against one client.
The in-process baseline runs with the torch thread count of one Triton instance (config.pbtxt).

Each round runs every side back to back, starting one further along each round (per call: served and in process;
Sample: served, embedded, served unpinned, the loop in this process); the figures are the median of the per-round
difference (per call) or ratio (Sample) with its quartiles, so that this shared machine's speed, which drifts by
10-20% over seconds, cancels within a round instead of landing on one side. The medians of each side are kept too.
Writes bench/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kinema.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from kinema.eval.report import write_results
from kinema.inference.model_config import parameters, read_config
from kinema.inference.runner import LocalRunner, TritonRunner
from kinema.pipelines.local import LocalDenoiser, load_local
from kinema.pipelines.protocols import SampleSpec
from kinema.repository import default_models_dir
from kinema.rpc import tensors
from kinema.rpc.denoising import RunnerNetwork
from kinema.rpc.process import SERVED_MODELS, ServiceProcess
from kinema.sampling.samplers import initial_noise
from kinema.tritonserver import PIN_CPUS_SETTING, TritonServer, TritonSettings

RESULTS = Path(__file__).parent / "results"
PROMPT = "a small red sphere to the left of a blue cube"


def rotated(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 5) -> dict[str, list[float]]:
    """Seconds of each of `fns` over `reps` rounds; each round runs every one of them back to back, starting one
    further along each round (a b c, b c a, c a b, ...), so that load and machine speed that come and go hit every
    side alike."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def relative(ta: list[float], tb: list[float]) -> dict:
    """Medians of two sides timed round by round (`rotated`, seconds), and the median and quartiles of the per-round
    ratio a/b and difference a - b (ms)."""
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    diffs = [1e3 * (x - y) for x, y in zip(ta, tb, strict=True)]

    def quartiles(v: list[float]) -> list[float]:
        return statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3

    (r25, r50, r75), (d25, d50, d75) = quartiles(ratios), quartiles(diffs)
    return {"a_ms": 1e3 * statistics.median(ta), "b_ms": 1e3 * statistics.median(tb), "pairs": len(ta),
            "ratio": r50, "ratio_q25": r25, "ratio_q75": r75, "diff_ms": d50, "diff_q25_ms": d25,
            "diff_q75_ms": d75}  # fmt: skip


def paired(a, b, reps: int, warmup: int = 5) -> dict:
    """`a` against `b`, a pair at a time in alternating order (a b, b a, ...): `relative` of their times."""
    times = rotated({"a": a, "b": b}, reps, warmup)
    return relative(times["a"], times["b"])


def call_overhead(triton: TritonRunner, local: LocalRunner, cond, reps: int) -> dict:
    x = initial_noise((2, 4, 16, 16), 0).numpy()
    calls = {
        "vae_decoder": {"LATENT": x[:1]},
        "denoiser": {"X": x, "T": np.full((2, 1), 0.5, np.float32), "CONTEXT": cond.tokens.numpy().repeat(2, 0),
                     "CONTEXT_MASK": cond.mask.numpy().repeat(2, 0), "POOLED": cond.pooled.numpy().repeat(2, 0)},
    }  # fmt: skip
    out = {}
    for model, inputs in calls.items():
        p = paired(lambda m=model, i=inputs: triton.infer(m, i), lambda m=model, i=inputs: local.infer(m, i), reps)
        kb = sum(a.nbytes for a in inputs.values()) / 1024
        out[model] = {"input_kb": round(kb, 1), "triton_ms": p["a_ms"], "in_process_ms": p["b_ms"],
                      "overhead_ms": p["diff_ms"], "overhead_q25_ms": p["diff_q25_ms"],
                      "overhead_q75_ms": p["diff_q75_ms"], "pairs": p["pairs"]}  # fmt: skip
    return out


def triton_stats(url: str, model: str) -> dict[str, tuple[int, int]]:
    """Triton's cumulative (count, ns) per phase of `model`'s requests (success, queue, compute_input/infer/output)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    finally:
        client.close()
    return {k: (int(v.get("count", 0)), int(v.get("ns", 0))) for k, v in stats.items()}


def per_request_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per request of each phase between two `triton_stats` snapshots: where a served step's time goes."""
    n = after["success"][0] - before["success"][0]
    phases = ("success", "queue", "compute_input", "compute_infer", "compute_output")
    return {f"{k}_ms": (after[k][1] - before[k][1]) / n / 1e6 for k in phases if n}


def step_breakdown(times: dict[str, list[float]], per_step: dict[str, float], steps: int = 28) -> dict[str, float]:
    """Where a served step's time goes, in ms per step, from means over the run (Triton's statistics are means): the
    network's call inside Triton's python backend beyond the embedded step (`in_stub`: the stub's handoff and its
    forward pass), Triton's own queueing and tensor copies (`triton_server`), the runner's request and gRPC round trip
    (`client`: a loop of runner calls in the bench's process against Triton's success time) and the denoiser service
    around that loop (`service`: its Sample stream against the same loop in the bench's process). They add up to the
    mean served step minus the mean embedded step."""
    step = {name: 1e3 * statistics.fmean(t) / steps for name, t in times.items()}
    return {"embedded_step": step["embedded"], "in_stub": per_step["compute_infer_ms"] - step["embedded"],
            "triton_server": per_step["success_ms"] - per_step["compute_infer_ms"],
            "client": step["runner_loop"] - per_step["success_ms"],
            "service": step["served"] - step["runner_loop"]}  # fmt: skip


def sample_request(cond_pb, uncond_pb, seed: int, steps: int) -> denoiser_pb2.SampleRequest:
    noise = tensors.encode(initial_noise((1, 4, 16, 16), seed))
    return denoiser_pb2.SampleRequest(noise=noise, cond=cond_pb, uncond=uncond_pb, steps=steps, guidance=4.0)


UNPINNED = "denoiser_unpinned"  # a denoiser_ name: the denoiser service serves it


def unpinned_copy(repo: Path) -> Path:
    """A working copy of `repo` with `UNPINNED` beside its denoiser: the same weights, its instances not pinned."""
    shutil.copytree(repo / "denoiser", repo / UNPINNED)
    config = repo / UNPINNED / "config.pbtxt"
    text = config.read_text()
    pin = 'key: "pin_cpus" value { string_value: "true" }'
    assert pin in text, "the denoiser's config no longer asks for pinning: update this bench"
    text = text.replace('name: "denoiser"', f'name: "{UNPINNED}"')
    config.write_text(text.replace(pin, pin.replace("true", "false")))
    return repo


def conditioning(e) -> denoiser_pb2.Conditioning:
    return denoiser_pb2.Conditioning(tokens=tensors.encode(e.tokens), mask=tensors.encode(e.mask),
                                     pooled=tensors.encode(e.pooled))  # fmt: skip


def mini_repository(root: Path) -> tuple[Path, LocalDenoiser]:
    """A model repository whose denoiser is the 'mini' MMDiT (6 x 256, random weights, seed 0): the issue's size."""
    from kinema.inference.model_config import sync_hashes
    from kinema.nn.checkpoint import save_checkpoint, sha256_file
    from kinema.nn.mmdit import PRESETS, MMDiT

    torch.manual_seed(0)
    model = MMDiT(PRESETS["mini"]).eval().requires_grad_(False)
    for p in model.parameters():  # adaLN-zero starts at zero output; give the network a real signal
        torch.nn.init.normal_(p, std=0.02)
    src = default_models_dir() / "denoiser"
    (root / "denoiser" / "1").mkdir(parents=True)
    shutil.copy(src / "config.pbtxt", root / "denoiser" / "config.pbtxt")
    shutil.copy(src / "1" / "model.py", root / "denoiser" / "1" / "model.py")
    weights = root / "denoiser" / "1" / "mmdit.safetensors"
    save_checkpoint(weights, model.state_dict(), model.params)
    sync_hashes(root)
    return root, LocalDenoiser(model, sha256_file(weights))


def measure(
    repo: Path, models: tuple[str, ...], denoiser: LocalDenoiser, cond, uncond, args, calls: bool = True
) -> dict:
    """Triton over `repo` plus the denoiser service; per-call overhead, a 28-step Sample, dynamic batching."""
    cond_pb, uncond_pb = conditioning(cond), conditioning(uncond)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = TritonSettings(models=repo, http_port=0, grpc_port=0, metrics_port=0, models_to_load=models)
        with TritonServer(settings, log_path=Path(tmp) / "triton.log") as triton:
            triton.wait_ready()
            service = ServiceProcess("denoiser", Path(tmp), KINEMA_BACKEND="triton", KINEMA_TRITON_URL=triton.grpc_url)
            service.start()
            try:
                runner = TritonRunner(triton.grpc_url)
                if calls:
                    results["call"] = call_overhead(runner, LocalRunner(repo), cond, args.reps)
                channel = service.channel()
                stub = denoiser_pb2_grpc.DenoiserStub(channel)

                def served(seed: int = 0, model: str = "") -> np.ndarray:
                    request = sample_request(cond_pb, uncond_pb, seed, 28)
                    request.model.name = model
                    events = list(stub.Sample(request, timeout=600))
                    return tensors.decode(events[-1].result.latents, "latents")

                def embedded(seed: int = 0) -> torch.Tensor:
                    noise = initial_noise((1, 4, 16, 16), seed)
                    return denoiser.sample(noise, cond, uncond, SampleSpec(28, 4.0), None)

                # The service's own loop in this process, over the same runner: the service's part is what Sample
                # adds to it.
                network = RunnerNetwork(runner, "denoiser", "", deadline=time.monotonic() + 24 * 3600)
                loop_here = LocalDenoiser(network, "", latent_channels=4)

                def runner_loop(seed: int = 0) -> torch.Tensor:
                    noise = initial_noise((1, 4, 16, 16), seed)
                    return loop_here.sample(noise, cond, uncond, SampleSpec(28, 4.0), None)

                diff = float(np.abs(served() - embedded().numpy()).max())
                assert torch.equal(runner_loop(), torch.from_numpy(served()))
                before = triton_stats(triton.grpc_url, "denoiser")
                times = rotated({"served": served, "embedded": embedded, "unpinned": lambda: served(model=UNPINNED),
                                 "runner_loop": runner_loop}, args.samples, warmup=1)  # fmt: skip
                per_step = per_request_ms(before, triton_stats(triton.grpc_url, "denoiser"))
                p = relative(times["served"], times["embedded"])
                results["sample_28_steps"] = {"served_ms": p["a_ms"], "embedded_ms": p["b_ms"], "ratio": p["ratio"],
                                              "ratio_q25": p["ratio_q25"], "ratio_q75": p["ratio_q75"],
                                              "overhead_per_step_ms": p["diff_ms"] / 28, "pairs": p["pairs"],
                                              "max_abs_diff": diff, "triton_per_step": per_step,
                                              "step_breakdown_ms": step_breakdown(times, per_step)}  # fmt: skip
                p = relative(times["unpinned"], times["embedded"])
                results["sample_28_steps_unpinned"] = {"served_ms": p["a_ms"], "ratio": p["ratio"],
                                                       "ratio_q25": p["ratio_q25"],
                                                       "ratio_q75": p["ratio_q75"]}  # fmt: skip
                p = relative(times["unpinned"], times["served"])
                results["sample_28_steps_unpinned"] |= {"over_pinned": p["ratio"], "over_pinned_q25": p["ratio_q25"],
                                                        "over_pinned_q75": p["ratio_q75"]}  # fmt: skip

                def throughput(clients: int, per_client: int) -> float:
                    def work(c: int) -> None:
                        for i in range(per_client):
                            served(seed=100 * c + i)

                    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
                    start = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    return clients * per_client / (time.perf_counter() - start)

                one = throughput(1, args.clients)
                many = throughput(args.clients, 1)
                results["dynamic_batching"] = {"clients": args.clients, "images_per_s_1_client": one,
                                               f"images_per_s_{args.clients}_clients": many,
                                               "ratio": many / one}  # fmt: skip
                channel.close()
                runner.close()
            finally:
                service.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=200, help="pairs of calls per network")
    ap.add_argument("--samples", type=int, default=21, help="pairs of Samples per size")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS / "serving")
    ap.add_argument("--note", default="", help="recorded with the results (e.g. what else ran on the machine)")
    args = ap.parse_args(argv)

    # Same compute on both sides: the embedded baseline gets the thread count of a Triton instance.
    threads = int(parameters(read_config(default_models_dir() / "denoiser")).get("torch_threads", "0"))
    if threads:
        torch.set_num_threads(threads)
    text_encoder, denoiser, _ = load_local()
    cond, uncond = text_encoder.encode([PROMPT]), text_encoder.encode([""])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in SERVED_MODELS:
            shutil.copytree(default_models_dir() / name, Path(tmp) / name)
        repo = unpinned_copy(Path(tmp))
        results["shipped_tiny"] = measure(repo, (*SERVED_MODELS, UNPINNED), denoiser, cond, uncond, args)
    with tempfile.TemporaryDirectory() as tmp:
        repo, mini = mini_repository(Path(tmp))
        results["mini"] = measure(unpinned_copy(repo), ("denoiser", UNPINNED), mini, cond, uncond, args, calls=False)
    results["torch_threads_per_side"] = torch.get_num_threads()
    results[PIN_CPUS_SETTING] = os.environ.get(PIN_CPUS_SETTING, "1 (the launcher's default)")
    if args.note:
        results["note"] = args.note
    command = "python bench/serving.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for path in write_results(args.out, results, command):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
