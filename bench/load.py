"""Load and back-pressure: many clients against the orchestrator of the local stack, which refuses what it cannot run.

    .venv/bin/python bench/load.py [--clients 100] [--seconds 60] [--steps 4] [--max-in-flight 8]

Starts the local stack (`kinema.stack.up`) over the small model repository bench/e2e.py uses (the mini denoiser
beside the shipped text encoder and autoencoder), every process with KINEMA_MAX_IN_FLIGHT = `--max-in-flight`.
Then `clients` threads, each with a channel of its own, loop for `seconds`: a text -> image Generate of `steps`
steps; a refusal (RESOURCE_EXHAUSTED with a retry hint, kinema.rpc.admission) is counted and the client sleeps the
hint times 1-2 (jitter) before it tries again; calls still running at the end are waited for (bounded: one call
deadline). A probe thread calls the cheap RPCs (ListPipelines, health) every second all along: they must never be
refused. Reported: completed and refused calls and other errors, the p50/p99 latency of completed calls (the call
that succeeded, and from a request's first try), the probe latencies, the orchestrator's own counters, and the
resident memory (RSS, from /proc, summed over each component's process group) of every stack process after a warm-up
call, at its peak and at the end, so that a leak under load shows. Writes bench/results/load.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kinema.eval.report import write_results
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from kinema.processes import group_members
from kinema.rpc.status import from_rpc_error
from kinema.stack import StackSettings, StackState, down, up

sys.path.insert(0, str(Path(__file__).parent))
from e2e import request, stack_repository  # bench/e2e.py: the same small repository and request

RESULTS = Path(__file__).parent / "results"
CALL_TIMEOUT = 300.0  # s: the deadline of one Generate; also bounds the wait for calls running at the end
RSS_EVERY = 5.0  # s between two memory samples


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every live process in group `pgid`, in MiB (VmRSS from /proc/<pid>/status)."""
    total_kb = 0
    for pid in group_members(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
        except (OSError, ValueError):
            continue  # it exited meanwhile
    return total_kb / 1024


def stack_rss(state: StackState) -> dict[str, float]:
    return {c.name: round(group_rss_mb(c.pid), 1) for c in state.components}


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def scrape(url: str) -> dict[str, float]:
    """The orchestrator's admission counters: rejected by method and reason, in-flight, limit, finished by code."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "kinema_rpc_rejected_total":
                out[f"rejected.{s.labels['method']}.{s.labels['reason']}"] = s.value
            elif s.name in ("kinema_admission_in_flight", "kinema_admission_limit"):
                out[s.name.removeprefix("kinema_")] = s.value
            elif s.name == "kinema_rpc_requests_total" and s.labels.get("method") == "Generate":
                out[f"generate_finished.{s.labels['code']}"] = s.value
    return out


class Tally:
    """What the clients saw, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.call_seconds: list[float] = []  # the attempt that completed
        self.request_seconds: list[float] = []  # from the request's first attempt, refusals and waits included
        self.refused = 0
        self.hints: list[float] = []
        self.errors: dict[str, int] = {}
        self.examples: list[str] = []

    def error(self, code: str, message: str) -> None:
        with self.lock:
            self.errors[code] = self.errors.get(code, 0) + 1
            if len(self.examples) < 5:
                self.examples.append(f"{code}: {message[:200]}")


def client(address: str, c: int, deadline: float, steps: int, tally: Tally) -> None:
    """Loop Generate until `deadline` (monotonic), honouring the server's retry hints."""
    rng = random.Random(c)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        i = 0
        while time.monotonic() < deadline:
            first = time.monotonic()
            while time.monotonic() < deadline:  # one request, tried until it runs or the window ends
                t0 = time.monotonic()
                try:
                    events = list(stub.Generate(pb.GenerateRequest(request=request(100_000 * c + i, steps)),
                                                timeout=CALL_TIMEOUT))  # fmt: skip
                except grpc.RpcError as err:
                    error = from_rpc_error(err)
                    if error.retry_after is not None:
                        with tally.lock:
                            tally.refused += 1
                            tally.hints.append(error.retry_after)
                        time.sleep(error.retry_after * rng.uniform(1.0, 2.0))
                        continue
                    tally.error(error.metadata.get("grpc_code", "UNKNOWN"), str(error))
                    time.sleep(1.0)  # not a refusal: do not hammer a failing server
                    break
                done = time.monotonic()
                if events and events[-1].HasField("result"):
                    with tally.lock:
                        tally.call_seconds.append(done - t0)
                        tally.request_seconds.append(done - first)
                else:
                    tally.error("NO_RESULT", "Generate ended without a result")
                break
            i += 1


def probe(address: str, stop: threading.Event, seen: dict) -> None:
    """Cheap calls once a second: ListPipelines and a health check; their latencies and failures."""
    with grpc.insecure_channel(address) as channel:
        stub, health = pb_grpc.OrchestratorStub(channel), health_pb2_grpc.HealthStub(channel)
        while not stop.wait(1.0):
            for name, call in (
                ("ListPipelines", lambda: stub.ListPipelines(pb.ListPipelinesRequest(), timeout=30)),
                ("health", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=30)),
            ):
                t0 = time.monotonic()
                try:
                    call()
                    seen["seconds"].append(time.monotonic() - t0)
                except grpc.RpcError as err:
                    seen["failed"].append(f"{name}: {err.code().name} {err.details()}")


def sample_memory(state: StackState, stop: threading.Event, series: list[dict[str, float]]) -> None:
    while not stop.wait(RSS_EVERY):
        series.append(stack_rss(state))


def load(state: StackState, clients: int, seconds: float, steps: int) -> dict:
    address = state.orchestrator
    with grpc.insecure_channel(address) as channel:  # warm-up: every component has served one call
        list(pb_grpc.OrchestratorStub(channel).Generate(pb.GenerateRequest(request=request(0, steps)), timeout=600))
    rss_start = stack_rss(state)
    tally, stop = Tally(), threading.Event()
    seen: dict = {"seconds": [], "failed": []}
    series: list[dict[str, float]] = [rss_start]
    helpers = [threading.Thread(target=probe, args=(address, stop, seen), daemon=True),
               threading.Thread(target=sample_memory, args=(state, stop, series), daemon=True)]  # fmt: skip
    start = time.monotonic()
    deadline = start + seconds
    threads = [threading.Thread(target=client, args=(address, c, deadline, steps, tally)) for c in range(clients)]
    for t in helpers + threads:
        t.start()
    for t in threads:
        t.join(seconds + CALL_TIMEOUT + 60)
    elapsed = time.monotonic() - start
    stop.set()
    for t in helpers:
        t.join(30)
    rss_end = stack_rss(state)
    series.append(rss_end)
    metrics = scrape(state.metrics["orchestrator"])
    calls, requests = tally.call_seconds, tally.request_seconds
    memory = {name: {"start_mb": rss_start[name], "peak_mb": max(s.get(name, 0.0) for s in series),
                     "end_mb": rss_end[name], "growth_mb": round(rss_end[name] - rss_start[name], 1)}
              for name in rss_start}  # fmt: skip
    total = {"start_mb": round(sum(rss_start.values()), 1), "end_mb": round(sum(rss_end.values()), 1),
             "peak_mb": round(max(sum(s.values()) for s in series), 1),
             "series_mb": [round(sum(s.values()), 1) for s in series]}  # fmt: skip
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "completed": len(calls),
        "completed_per_minute": round(60 * len(calls) / elapsed, 1),
        "refused": tally.refused,
        "other_errors": tally.errors,
        "error_examples": tally.examples,
        "call_latency_p50_s": percentile(calls, 0.5),
        "call_latency_p99_s": percentile(calls, 0.99),
        "call_latency_max_s": max(calls, default=None),
        "request_latency_p50_s": percentile(requests, 0.5),
        "request_latency_p99_s": percentile(requests, 0.99),
        "retry_hint_median_s": statistics.median(tally.hints) if tally.hints else None,
        "cheap_calls": {
            "answered": len(seen["seconds"]),
            "failed": len(seen["failed"]),
            "p50_s": percentile(seen["seconds"], 0.5),
            "max_s": max(seen["seconds"], default=None),
            "failures": seen["failed"][:5],
        },
        "orchestrator_metrics": metrics,
        "rss": memory,
        "rss_total": total,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the clients start new requests")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps of each Generate")
    ap.add_argument("--max-in-flight", type=int, default=8,
                    help="KINEMA_MAX_IN_FLIGHT of every stack process (the product default is 32)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "load")
    ap.add_argument("--note", default="", help="recorded with the results (e.g. what else ran on the machine)")
    args = ap.parse_args(argv)

    os.environ["KINEMA_MAX_IN_FLIGHT"] = str(args.max_in_flight)  # the stack's processes inherit the environment
    config = {"clients": args.clients, "seconds": args.seconds, "steps": args.steps,
              "max_in_flight": args.max_in_flight, "size": 64, "denoiser": "mini (6 x 256)"}  # fmt: skip
    results: dict = {"config": config}
    with tempfile.TemporaryDirectory() as tmp:
        repo = stack_repository(Path(tmp) / "models")
        run_dir = Path(tmp) / "stack"
        state = up(StackSettings(run_dir=run_dir, port=0, models=repo), report=lambda line: print(line, flush=True))
        try:
            results["load"] = load(state, args.clients, args.seconds, args.steps)
            print("load:", results["load"], flush=True)
        finally:
            down(run_dir)
    if args.note:
        results["note"] = args.note
    command = "python bench/load.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for path in write_results(args.out, results, command):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
