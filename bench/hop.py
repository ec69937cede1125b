"""What one call through Triton costs on this machine, after a forward pass's idle (cold) and back to back (warm).

    .venv/bin/python bench/hop.py [--rounds 200] [--idle-ms 0 (the measured forward)]

A served sampling step is one Triton call (docs/serving.md, rule 5 of the house architecture), and every process
on the call's path has slept for a forward pass when the next one goes out. This measures that floor with no
network in it: Triton (a real server, started here) serves a python-backend model with the denoiser's config
whose `execute` echoes X, called with the mini denoiser's inputs at 64 px (CFG batch of 2) through
`TritonRunner`, and Triton's ServerReady (no backend). Each round sleeps `idle` then calls (cold) and at once
calls again (warm), for both; `idle` defaults to the median forward pass of the mini denoiser measured in this
process first (`run_batch`, the stub's own call, one torch thread as the config asks).

The per-step floor share is the cold echo round trip over that forward: what every step of a served Sample
pays on top of its forward before the denoiser service, the orchestrator or the stub's own overhead add
anything. Writes bench/results/hop.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from tritonclient.grpc import service_pb2

from kinema.eval.report import write_results
from kinema.inference.model_config import parameters, read_config
from kinema.inference.networks import load_network, run_batch
from kinema.inference.runner import TritonRunner
from kinema.tritonserver import TritonServer, TritonSettings

sys.path.insert(0, str(Path(__file__).parent))
from serving import mini_repository  # bench/serving.py: the same mini denoiser

RESULTS = Path(__file__).parent / "results"
SIZE, PROMPT_TOKENS = 64, 13  # the e2e benchmark's image size; its prompt's token count

ECHO_PY = '''"""The denoiser's interface with no network: VELOCITY = X (bench/hop.py)."""
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("VELOCITY", pb_utils.get_input_tensor_by_name(r, "X")
                                                            .as_numpy())]) for r in requests]
'''


def quartiles(ms: list[float]) -> dict[str, float]:
    q25, q50, q75 = statistics.quantiles(ms, n=4)
    return {"median_ms": q50, "q25_ms": q25, "q75_ms": q75}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--idle-ms", type=float, default=0.0, help="0: the mini forward pass measured here")
    ap.add_argument("--out", type=Path, default=RESULTS / "hop")
    args = ap.parse_args(argv)
    if args.rounds < 4 or args.idle_ms < 0:
        ap.error("--rounds must be at least 4 and --idle-ms at least 0")

    with tempfile.TemporaryDirectory() as tmp:
        repo, _ = mini_repository(Path(tmp) / "mini")
        served = parameters(read_config(repo / "denoiser"))
        torch.set_num_threads(int(served.get("torch_threads", "1")) or 1)
        network = load_network("denoiser", repo / "denoiser" / "1", served)
        p, rng = network.model.params, np.random.default_rng(0)
        side = SIZE // 4  # the shipped autoencoder's 64 px latent
        inputs = {"X": rng.standard_normal((2, p.in_channels, side, side), dtype=np.float32),
                  "T": np.full((2, 1), 0.5, np.float32),
                  "CONTEXT": rng.standard_normal((2, PROMPT_TOKENS, p.context_dim), dtype=np.float32),
                  "CONTEXT_MASK": np.ones((2, PROMPT_TOKENS), bool),
                  "POOLED": rng.standard_normal((2, p.pooled_dim), dtype=np.float32)}  # fmt: skip
        for _ in range(5):
            run_batch(network, [inputs])
        forward = [timed(lambda: run_batch(network, [inputs])) for _ in range(30)]
        idle_ms = args.idle_ms or statistics.median(forward)

        echo = Path(tmp) / "echo"
        (echo / "denoiser" / "1").mkdir(parents=True)
        shutil.copy(repo / "denoiser" / "config.pbtxt", echo / "denoiser" / "config.pbtxt")
        (echo / "denoiser" / "1" / "model.py").write_text(ECHO_PY)
        settings = TritonSettings(models=echo, http_port=0, grpc_port=0, metrics_port=0, models_to_load=("denoiser",))
        with TritonServer(settings, log_path=Path(tmp) / "triton.log") as triton:
            triton.wait_ready()
            runner = TritonRunner(triton.grpc_url)
            channel = grpc.insecure_channel(triton.grpc_url)
            server_ready = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerReady",
                request_serializer=service_pb2.ServerReadyRequest.SerializeToString,
                response_deserializer=service_pb2.ServerReadyResponse.FromString,
            )
            calls = {"echo": lambda: runner.infer("denoiser", inputs),
                     "server_ready": lambda: server_ready(service_pb2.ServerReadyRequest(), timeout=60)}  # fmt: skip
            for call in calls.values():
                for _ in range(20):
                    call()
            times: dict[str, dict[str, list[float]]] = {k: {"cold": [], "warm": []} for k in calls}
            for i in range(args.rounds):
                for name in list(calls)[i % 2 :] + list(calls)[: i % 2]:
                    time.sleep(idle_ms / 1e3)
                    times[name]["cold"].append(timed(calls[name]))
                    times[name]["warm"].append(timed(calls[name]))
            runner.close()
            channel.close()

    shapes = {k: list(v.shape) for k, v in inputs.items()}
    config = {"size": SIZE, "denoiser": "mini (6 x 256)", "inputs": shapes, "rounds": args.rounds, "idle_ms": idle_ms,
              "torch_threads": torch.get_num_threads()}  # fmt: skip
    results: dict = {"config": config, "forward_in_process": quartiles(forward)}
    for name, sides in times.items():
        results[name] = {side: quartiles(ms) for side, ms in sides.items()}
        results[name]["cold_over_warm"] = statistics.median(
            c / w for c, w in zip(sides["cold"], sides["warm"], strict=True)
        )
    results["floor_share_of_step"] = results["echo"]["cold"]["median_ms"] / results["forward_in_process"]["median_ms"]
    command = ("python bench/hop.py " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    for path in write_results(args.out, results, command):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
