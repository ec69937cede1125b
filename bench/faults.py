"""Fault injection on the local stack: jobs keep coming while each component is killed (-9) and restarted in turn.

    .venv/bin/python bench/faults.py [--jobs 60] [--interval 3] [--steps 4] [--gap 20] [--visibility-timeout 60]

Starts the local stack (`kinema.stack.up`) over the small model repository bench/e2e.py uses. A submitter thread
sends text -> image jobs of `steps` steps, one every `interval` s until the last fault is over (and at least `jobs`),
each with an idempotency key of its own and tried again (same key) while the orchestrator does not answer, for at most
SUBMIT_PATIENCE s. Meanwhile, `gap` s apart, each component in FAULTS gets SIGKILL on its whole process group (while
one of the jobs runs, when one comes within 15 s), stays down `down` s, and is started again on its recorded address
and data folder (as `kinema stack up` started it; the state file is updated, so that `kinema stack down` stops the
new process). Then every accepted job is followed until it ends or `drain` s pass, and judged:

- every job COMPLETED, or FAILED with a reason (`Job.error`): none left QUEUED/RUNNING (stuck), none NOT_FOUND (lost),
  and ListJobs holds exactly the accepted jobs (no duplicates);
- every COMPLETED job's outputs download through their presigned URLs and hash to their recorded sha256;
- retries stay bounded: `attempts` <= KINEMA_JOB_MAX_ATTEMPTS for every job.

`--visibility-timeout` sets KINEMA_JOB_VISIBILITY_TIMEOUT_SECONDS (default 6 h in the product): how long a job whose
worker was killed stays RUNNING before the broker hands it out again. The jobs here take seconds, so a minute is
safe and lets the run see the redelivery. Writes bench/results/faults.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from kinema.client import read_url
from kinema.errors import KinemaError
from kinema.eval.report import write_results
from kinema.orchestration.settings import ENV_VARS as ORCHESTRATOR_VARS
from kinema.orchestration.settings import OrchestratorSettings
from kinema.orchestrator.v1 import orchestrator_pb2 as pb
from kinema.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from kinema.processes import free_ports, kill_group, wait_until
from kinema.rpc.status import from_rpc_error
from kinema.stack import (
    BUCKET,
    HOST,
    WORKER_APP,
    WORKER_NAME,
    Component,
    StackSettings,
    StackState,
    down,
    is_running,
    process_start_time,
    up,
    write_state,
)
from kinema.storage.artifacts import ENV_ACCESS_KEY, ENV_SECRET_KEY

sys.path.insert(0, str(Path(__file__).parent))
from e2e import request, stack_repository  # bench/e2e.py: the same small repository and request

RESULTS = Path(__file__).parent / "results"
FAULTS = ("triton", "denoiser", "orchestrator", "worker", "redis", "s3")  # the order
TENANT = "faults"
SUBMIT_PATIENCE = 180.0  # s one submit is tried again while the orchestrator (or Redis) is down
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
Q, R, C, F, X = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED,
                 pb.JOB_STATE_CANCELLED)  # fmt: skip


class Restarts:
    """Kill -9 and start again one component of a running stack, on its recorded address and data.

    `kinema.stack` has no such call; this repeats what its `_Launch.run` does for one component, from the state file
    (addresses, ports, credentials) and the settings of the `up`. The API it stands in for: `kinema.stack.restart(
    run_dir, name)` (start a dead component again as `up` did, record it) and `kinema.stack.kill(run_dir, name)`.
    """

    def __init__(self, state: StackState, settings: StackSettings) -> None:
        self.state, self.settings = state, settings
        self.run_dir = Path(state.run_dir)
        self.logs, self.data = self.run_dir / "logs", self.run_dir / "data"
        self.launchers: list[Any] = []  # what this started, recorded or not (a start that failed half-way)

    def stop(self) -> None:
        """Stop whatever this started that `kinema.stack.down` did not (it stops what the state file records)."""
        for launcher in self.launchers:
            with contextlib.suppress(Exception):
                launcher.stop()

    def kill(self, name: str) -> None:
        """SIGKILL to the component's whole process group, as a crash (or the OOM killer) would end it."""
        c = self.state.component(name)
        kill_group(c.pid, signal.SIGKILL)
        if not wait_until(lambda: not is_running(c), 10.0):
            raise RuntimeError(f"{name} (group {c.pid}) still runs after SIGKILL")

    def start(self, name: str) -> float:
        """Start `name` again and wait until it is healthy; the seconds that took."""
        t0 = time.monotonic()
        launch = getattr(self, f"_start_{name}", None) or self._start_model_service
        pid, address = launch(name)
        c = self.state.component(name)
        fresh = Component(name=name, pid=pid, start_time=process_start_time(pid) or 0, address=address,
                          log=str(self.logs / f"{name}.restart.log"), probe=c.probe)  # fmt: skip
        self.state.components = [fresh if x.name == name else x for x in self.state.components]
        write_state(self.state)
        return time.monotonic() - t0

    def _log(self, name: str) -> Path:
        return self.logs / f"{name}.restart.log"

    def _port(self, name: str) -> int:
        return int(self.state.component(name).address.rsplit(":", 1)[1])

    def _start_redis(self, name: str) -> tuple[int, str]:
        from kinema.jobs.redis_server import RedisServer, RedisSettings

        port = urlsplit(self.state.redis_url).port
        redis = RedisServer(RedisSettings(host=HOST, port=port, data_dir=self.data / "redis"), log_path=self._log(name))
        redis.start()
        self.launchers.append(redis)
        redis.wait_ready()
        return redis.pid, redis.url

    def _start_s3(self, name: str) -> tuple[int, str]:
        from kinema.storage.s3server import S3Server, S3ServerSettings, remove_sockets

        s3 = self.state.s3
        ports = {k: int(v) for k, v in s3.items() if k.endswith("_port")}
        remove_sockets(ports.values())  # a killed weed leaves its unix sockets behind, which a new one cannot bind
        for leftover in (self.data / "s3" / "s3.sock", self.data / "s3" / "filer.sock"):
            if leftover.is_socket():
                leftover.unlink()
        settings = S3ServerSettings(data_dir=self.data / "s3", host=HOST, access_key=s3["access_key"],
                                    secret_key=s3["secret_key"], **ports)  # fmt: skip
        server = S3Server(settings, log_path=self._log(name))
        server.start()
        self.launchers.append(server)
        server.wait_ready()
        return server.pid, server.endpoint

    def _start_triton(self, name: str) -> tuple[int, str]:
        from kinema.tritonserver import TritonServer, TritonSettings

        t = self.state.triton
        port = {k: int(str(t[k]).rsplit(":", 1)[1].split("/")[0]) for k in ("grpc", "http", "metrics")}
        settings = TritonSettings(
            models=self.settings.models,
            host=HOST,
            http_port=port["http"],
            grpc_port=port["grpc"],
            metrics_port=port["metrics"],
            models_to_load=tuple(t["models"]),
            startup_timeout=self.settings.startup_timeout,
        )
        server = TritonServer(settings, log_path=self._log(name))
        server.start()
        self.launchers.append(server)
        server.wait_ready()
        return server.pid, server.grpc_url

    def _start_model_service(self, name: str) -> tuple[int, str]:
        from kinema.rpc.process import ServiceProcess

        proc = ServiceProcess(name, self.logs, port=self._port(name), log_name=f"{name}.restart.log", detached=True,
                              KINEMA_BACKEND="triton", KINEMA_TRITON_URL=self.state.triton["grpc"])  # fmt: skip
        self.launchers.append(proc.launch())
        proc.wait_healthy(self.settings.startup_timeout)
        self.state.metrics[name] = f"http://{HOST}:{proc.metrics_port}/metrics"
        return proc.proc.pid, proc.address

    def _shared_env(self) -> dict[str, str]:
        """The environment the orchestrator and its worker share, as `kinema stack up` builds it."""
        env = {}
        for c in self.state.components:
            var = f"KINEMA_{c.name.upper()}_URL"
            if var in ORCHESTRATOR_VARS.values():
                env[var] = c.address
        return env | {"KINEMA_ARTIFACTS": f"s3://{BUCKET}?endpoint={self.state.s3['endpoint']}",
                      "KINEMA_REDIS_URL": self.state.redis_url, ENV_ACCESS_KEY: self.state.s3["access_key"],
                      ENV_SECRET_KEY: self.state.s3["secret_key"], "OMP_NUM_THREADS": "1"}  # fmt: skip

    def _start_orchestrator(self, name: str) -> tuple[int, str]:
        from kinema.rpc.process import ServiceProcess

        proc = ServiceProcess(name, self.logs, port=self._port(name), log_name=f"{name}.restart.log", detached=True,
                              **self._shared_env())  # fmt: skip
        self.launchers.append(proc.launch())
        proc.wait_healthy(self.settings.startup_timeout)
        self.state.metrics[name] = f"http://{HOST}:{proc.metrics_port}/metrics"
        return proc.proc.pid, proc.address

    def _start_worker(self, name: str) -> tuple[int, str]:
        from kinema.jobs.celery_app import CeleryWorker, WorkerSettings
        from kinema.rpc.process import REPO

        metrics = free_ports(HOST, 1)[0]
        url = self.state.redis_url
        settings = WorkerSettings(app=WORKER_APP, broker_url=url, backend_url=url,
                                  concurrency=self.settings.worker_concurrency, name=WORKER_NAME, pythonpath=(REPO,),
                                  env=self._shared_env() | {"KINEMA_METRICS_PORT": str(metrics)},
                                  startup_timeout=self.settings.startup_timeout)  # fmt: skip
        worker = CeleryWorker(settings, log_path=self._log(name))
        worker.start()
        self.launchers.append(worker)
        worker.wait_ready()
        self.state.metrics[name] = f"http://{HOST}:{metrics}/metrics"
        return worker.pid, worker.node


class Submitter(threading.Thread):
    """Submits a job every `interval` s, at least `count` of them and on until `done` is set, each tried again with
    its key until the orchestrator takes it."""

    def __init__(self, address: str, count: int, interval: float, steps: int, tag: str) -> None:
        super().__init__(daemon=True)
        self.address, self.count, self.interval, self.steps, self.tag = address, count, interval, steps, tag
        self.done = threading.Event()  # the faults are over: stop once `count` jobs were submitted
        self.accepted: dict[int, str] = {}  # submit index -> job id
        self.given_up: dict[int, str] = {}  # submit index -> last error
        self.errors: collections.Counter[str] = collections.Counter()  # failed submit tries, by status code

    def run(self) -> None:
        md = (("kinema-tenant", TENANT),)
        with grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.OrchestratorStub(channel)
            i = -1
            while (i := i + 1) < self.count or not self.done.is_set():
                t_next = time.monotonic() + self.interval
                submit = pb.SubmitJobRequest(request=request(1000 + i, self.steps), idempotency_key=f"{self.tag}-{i}")
                deadline = time.monotonic() + SUBMIT_PATIENCE
                while True:
                    try:
                        self.accepted[i] = stub.SubmitJob(submit, timeout=30, metadata=md).job.id
                        break
                    except grpc.RpcError as err:
                        error = from_rpc_error(err)
                        code = error.metadata["grpc_code"]
                        self.errors[code] += 1
                        if code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED") or (
                            time.monotonic() > deadline
                        ):
                            self.given_up[i] = f"{code}: {error}"
                            break
                        time.sleep(max(0.5, error.retry_after or 0.0))
                time.sleep(max(0.0, t_next - time.monotonic()))


def call(address: str, method: str, message, patience: float = 120.0):
    """One orchestrator call as tenant TENANT, tried again while the orchestrator does not answer."""
    deadline = time.monotonic() + patience
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        while True:
            try:
                return getattr(stub, method)(message, timeout=30, metadata=(("kinema-tenant", TENANT),))
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def running_job(address: str, patience: float) -> str:
    """The id of one of our jobs RUNNING now and started in the last 10 s (not one whose worker died before), waiting
    up to `patience` s for one; "" if none came."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            jobs = call(address, "ListJobs", pb.ListJobsRequest(state=R, page_size=50), patience=5.0).jobs
        except grpc.RpcError:
            jobs = []
        for job in jobs:
            if time.time() - job.started_at.ToSeconds() < 10.0:
                return job.id
        time.sleep(0.1)
    return ""


def follow(address: str, ids: list[str], drain: float) -> dict[str, pb.Job | str]:
    """Each job once it ended, or as it is when `drain` s have passed ("NOT_FOUND" for a job that is gone)."""
    deadline = time.monotonic() + drain
    last: dict[str, pb.Job | str] = {}
    pending = list(ids)
    while pending:
        for job_id in list(pending):
            try:
                job = call(address, "GetJob", pb.GetJobRequest(id=job_id)).job
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                last[job_id] = "NOT_FOUND"
                pending.remove(job_id)
                continue
            last[job_id] = job
            if job.state in (C, F, X):
                pending.remove(job_id)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    return last


def judge(address: str, jobs: dict[str, pb.Job | str], max_attempts: int) -> dict:
    """The verdict on every accepted job: states, failure reasons, artifacts, attempts, duplicates."""
    states: collections.Counter[str] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    stuck, lost, verified, bad, outcomes, unexplained, no_detail_reason = [], [], 0, [], [], [], 0
    attempts: collections.Counter[int] = collections.Counter()
    for job_id, job in jobs.items():
        if job == "NOT_FOUND":
            lost.append(job_id)
            states["NOT_FOUND"] += 1
            continue
        states[pb.JobState.Name(job.state)] += 1
        attempts[job.attempts] += 1
        took = job.finished_at.ToSeconds() - job.created_at.ToSeconds() if job.finished_at.seconds else None
        outcome = f"{pb.JobState.Name(job.state).removeprefix('JOB_STATE_')} attempts={job.attempts}"
        outcomes.append(f"{job_id} {outcome}" + (f" submit->end={took:.0f}s" if took is not None else ""))
        if job.state in (Q, R):
            stuck.append(f"{job_id}: {pb.JobState.Name(job.state)} after {job.attempts} attempts")
        elif job.state == F:
            name = next((c.name for c in grpc.StatusCode if c.value[0] == job.error.code), str(job.error.code))
            failures[f"{name} {job.error.detail.reason or '(no ErrorDetail.reason)'}: {job.error.message[:140]}"] += 1
            if not (job.error.code and job.error.message):
                unexplained.append(job_id)
            if not job.error.detail.reason:
                no_detail_reason += 1
        elif job.state == C:
            for output in job.outputs:
                try:
                    read_url(output.presigned_url, output.artifact.sha256, output.artifact.size_bytes, timeout=60)
                    verified += 1
                except KinemaError as e:
                    bad.append(f"{job_id} output {output.index}: {e.reason}: {str(e)[:160]}")
            if not job.outputs:
                bad.append(f"{job_id}: COMPLETED without outputs")
    listed = []
    token = ""
    while True:
        page = call(address, "ListJobs", pb.ListJobsRequest(page_size=1000, page_token=token))
        listed += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    return {
        "states": dict(states),
        "failures": dict(failures),
        "failed_without_detail_reason": no_detail_reason,
        "stuck": stuck,
        "lost": lost,
        "outputs_verified": verified,
        "outputs_bad": bad,
        "attempts_histogram": {str(k): v for k, v in sorted(attempts.items())},
        "max_attempts_seen": max(attempts, default=0),
        "listed": len(listed),
        "listed_duplicates": len(listed) - len(set(listed)),
        "listed_unknown": sorted(set(listed) - set(jobs)),
        "checks": {
            "all_ended": not stuck and not lost,
            "failed_have_reasons": not unexplained,  # a status code and a message
            "artifacts_ok": not bad,
            "retries_bounded": max(attempts, default=0) <= max_attempts,
            "no_duplicates": len(listed) == len(set(listed)) == len(jobs),
        },
        "jobs": sorted(outcomes, key=lambda line: ("COMPLETED attempts=1 " in line, line)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=60)
    ap.add_argument("--interval", type=float, default=3.0, help="seconds between two submits")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of jobs before the first fault")
    ap.add_argument("--gap", type=float, default=20.0, help="seconds between a restart and the next kill")
    ap.add_argument("--down", type=float, default=2.0, help="seconds a killed component stays down")
    ap.add_argument("--drain", type=float, default=300.0, help="seconds to wait for the jobs to end afterwards")
    visibility_help = "KINEMA_JOB_VISIBILITY_TIMEOUT_SECONDS of the stack (the product default is 21600)"
    ap.add_argument("--visibility-timeout", type=float, default=60.0, help=visibility_help)
    ap.add_argument("--faults", nargs="*", default=list(FAULTS), choices=FAULTS)
    ap.add_argument("--keep-logs", type=Path, default=None, help="copy every component's log here before cleaning up")
    ap.add_argument("--out", type=Path, default=RESULTS / "faults")
    ap.add_argument("--note", default="", help="recorded with the results")
    args = ap.parse_args(argv)

    os.environ["KINEMA_JOB_VISIBILITY_TIMEOUT_SECONDS"] = str(args.visibility_timeout)  # the stack inherits it
    defaults = {f.name: f.default for f in dataclasses.fields(OrchestratorSettings)}  # the stack runs with these
    results: dict = {"config": {"jobs": args.jobs, "interval_s": args.interval, "steps": args.steps,
                                "faults": args.faults, "down_s": args.down, "gap_s": args.gap,
                                "visibility_timeout_s": args.visibility_timeout,
                                "job_max_retries": defaults["job_max_retries"],
                                "job_max_attempts": defaults["job_max_attempts"]}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        repo = stack_repository(Path(tmp) / "models")
        settings = StackSettings(run_dir=Path(tmp) / "stack", port=0, models=repo)
        state = up(settings, report=lambda line: print(line, flush=True))
        restarts = None
        try:
            restarts = Restarts(state, settings)
            submitter = Submitter(state.orchestrator, args.jobs, args.interval, args.steps, f"f{os.getpid()}")
            t0 = time.monotonic()
            submitter.start()
            time.sleep(args.warmup)
            timeline = []
            for name in args.faults:
                mid_job = running_job(state.orchestrator, 15.0)  # kill while a job runs, where one comes in time
                killed = time.monotonic() - t0
                restarts.kill(name)
                print(f"{killed:6.1f} s  killed {name}", flush=True)
                time.sleep(args.down)
                seconds = restarts.start(name)
                print(f"{time.monotonic() - t0:6.1f} s  {name} back ({seconds:.1f} s to healthy)", flush=True)
                timeline.append({"component": name, "killed_at_s": round(killed, 1), "down_s": args.down,
                                 "restart_to_healthy_s": round(seconds, 1),
                                 "job_running_at_kill": mid_job})  # fmt: skip
                time.sleep(args.gap)
            submitter.done.set()
            submitter.join(SUBMIT_PATIENCE * 2 + args.jobs * args.interval)
            print(f"{time.monotonic() - t0:6.1f} s  submitted {len(submitter.accepted)} jobs; following them",
                  flush=True)  # fmt: skip
            jobs = follow(state.orchestrator, list(submitter.accepted.values()), args.drain)
            results["timeline"] = timeline
            results["submits"] = {"accepted": len(submitter.accepted), "given_up": submitter.given_up,
                                  "failed_tries_by_code": dict(submitter.errors)}  # fmt: skip
            results["verdict"] = judge(state.orchestrator, jobs, defaults["job_max_attempts"])
            results["seconds"] = round(time.monotonic() - t0, 1)
            print("verdict:", results["verdict"], flush=True)
        finally:
            down(Path(settings.run_dir))
            if restarts is not None:
                restarts.stop()
            if args.keep_logs is not None:
                shutil.copytree(Path(settings.run_dir) / "logs", args.keep_logs, dirs_exist_ok=True)
    if args.note:
        results["note"] = args.note
    command = "python bench/faults.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for path in write_results(args.out, results, command):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
