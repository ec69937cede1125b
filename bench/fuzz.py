"""Long fuzz run: malformed requests to every RPC of every service over real gRPC, with their status codes counted.

    .venv/bin/python bench/fuzz.py [--per-service 10000] [--seed 0]

Starts Triton over models/, the three model services, an orchestrator with jobs (real Redis and S3 server; no worker,
so accepted jobs wait queued), the distill service with distillation jobs on (the same Redis; queued likewise, so
later starts for the same teacher answer ALREADY_EXISTS), the depth service and the interpret service with fitting
jobs on (the same Redis; queued likewise), then sends
`per-service` requests to each service, spread evenly over its RPCs, drawn by `kinema.testing.fuzz.messages` (the
strategies tests/services/test_fuzz.py, tests/services/test_fuzz_distill.py,
tests/services/test_fuzz_depth_interpret.py and tests/orchestrator/test_fuzz.py sample). Counts each status code per
RPC, fails the run if any answer is INTERNAL, UNKNOWN or DATA_LOSS, and checks after each service that it still
answers health SERVING. Writes bench/results/fuzz.{json,md} (`--out`: another path, without the suffix).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings

from kinema.eval.report import write_results
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from kinema.repository import default_models_dir
from kinema.rpc.process import SERVED_MODELS, ServiceProcess
from kinema.storage.s3server import S3Server, S3ServerSettings
from kinema.testing.fuzz import FORBIDDEN, classify, messages
from kinema.tritonserver import TritonServer, TritonSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.orchestrator.conftest import jobs_env
from tests.orchestrator.test_fuzz import RPCS as ORCHESTRATOR_RPCS  # the same strategies as the CI sample
from tests.services.test_fuzz import RPCS as MODEL_RPCS
from tests.services.test_fuzz_depth_interpret import RPCS as DEPTH_INTERPRET_RPCS
from tests.services.test_fuzz_depth_interpret import requests as depth_interpret_requests
from tests.services.test_fuzz_distill import RPCS as DISTILL_RPCS
from tests.services.test_fuzz_distill import requests as distill_requests

RESULTS = Path(__file__).parent / "results"


def fuzz_rpc(channel: grpc.Channel, stub_type, method: str, strategy, streaming: bool, n: int, rng_seed: int) -> dict:
    call = getattr(stub_type(channel), method)
    codes: Counter[str] = Counter()
    bad: list[str] = []
    started = time.perf_counter()

    @seed(rng_seed)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(request) -> None:
        sent = iter(request) if streaming else request
        try:
            code = classify(lambda: call(sent, timeout=60))
        except grpc.RpcError as e:
            code = e.code()
        codes[code.name] += 1
        if code in FORBIDDEN and len(bad) < 5:
            bad.append(f"{code.name}: {str(request)[:300]!r}")

    one()
    healthy = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    return {"requests": sum(codes.values()), "codes": dict(codes.most_common()), "forbidden": bad,
            "healthy_after": healthy, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-service", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "fuzz")
    args = ap.parse_args(argv)

    results: dict = {"per_service": args.per_service, "seed": args.seed}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings_ = TritonSettings(models=default_models_dir(), http_port=0, grpc_port=0, metrics_port=0,
                                   models_to_load=SERVED_MODELS)  # fmt: skip
        with (TritonServer(settings_, log_path=root / "triton.log") as triton,
              RedisServer(RedisSettings(), log_path=root / "redis.log") as redis_server,
              S3Server(S3ServerSettings(data_dir=root / "s3"), log_path=root / "s3.log") as s3):  # fmt: skip
            triton.wait_ready()
            model_env = {"KINEMA_BACKEND": "triton", "KINEMA_TRITON_URL": triton.grpc_url}
            services = {name: ServiceProcess(name, root, **model_env).start()
                        for name in ("text_encoder", "autoencoder", "denoiser")}  # fmt: skip
            addresses = {name: s.address for name, s in services.items()}
            env = jobs_env(addresses, s3, redis_server.url, "kinema-fuzz")
            orchestrator = ServiceProcess("orchestrator", root, **env).start()
            distill = ServiceProcess("distill", root, KINEMA_REDIS_URL=redis_server.url, **model_env)
            # not in `addresses`: the orchestrator is fuzzed as the CI sample starts it, without a depth service
            # interpret with fitting jobs on: accepted fittings wait queued, as distillations do
            others = {
                "depth": ServiceProcess("depth", root, **model_env),
                "interpret": ServiceProcess("interpret", root, KINEMA_REDIS_URL=redis_server.url, **model_env),
            }
            try:
                distill.start()
                for p in others.values():
                    p.start()
                plan = [(name, stub, method, messages(request_type), False)
                        for name, stub, method, request_type in MODEL_RPCS]  # fmt: skip
                plan += [("orchestrator", pb_grpc.OrchestratorStub, method, strategy, streaming)
                         for method, (strategy, streaming) in ORCHESTRATOR_RPCS.items()]  # fmt: skip
                plan += [(name, stub, method, distill_requests(method, request_type), False)
                         for name, stub, method, request_type in DISTILL_RPCS]  # fmt: skip
                plan += [(name, stub, method, depth_interpret_requests(method, request_type), False)
                         for name, stub, method, request_type in DEPTH_INTERPRET_RPCS]  # fmt: skip
                processes = services | {"orchestrator": orchestrator, "distill": distill} | others
                for service in processes:
                    rpcs = [p for p in plan if p[0] == service]
                    each = max(1, args.per_service // len(rpcs))
                    with processes[service].channel() as channel:
                        for _, stub, method, strategy, streaming in rpcs:
                            r = fuzz_rpc(channel, stub, method, strategy, streaming, each, args.seed)
                            results[f"{service}.{method}"] = r
                            print(f"{service}.{method}: {r}", flush=True)
            finally:
                for p in others.values():
                    p.stop()
                distill.stop()
                orchestrator.stop()
                for s in services.values():
                    s.stop()
    rpcs = [v for v in results.values() if isinstance(v, dict)]
    results["total_requests"] = sum(r["requests"] for r in rpcs)
    results["forbidden_answers"] = sum(len(r["forbidden"]) for r in rpcs)
    results["all_healthy_after"] = all(r["healthy_after"] for r in rpcs)
    command = "python bench/fuzz.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for path in write_results(args.out, results, command):
        print(f"wrote {path}")
    if results["forbidden_answers"] or not results["all_healthy_after"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
