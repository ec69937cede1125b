"""`kinema stack up|status|down`: the whole distributed shape started on loopback, used through the CLI, stopped
again with nothing left running; and the cases that need no stack (nothing running, a dead component, a second
`up`, a component that does not start)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from kinema.cli import main
from kinema.depth.v1 import depth_pb2, depth_pb2_grpc
from kinema.interpret.v1 import interpret_pb2, interpret_pb2_grpc
from kinema.jobs.redis_server import RedisServer, RedisSettings
from kinema.nn.checkpoint import sha256_file
from kinema.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from kinema.processes import wait_until
from kinema.repository import default_models_dir
from kinema.rpc import tensors
from kinema.stack import Component, StackState, is_running, process_start_time, read_state, state_path, write_state

STUDENT_SHA = sha256_file(default_models_dir() / "denoiser_4step/1/mmdit.safetensors")  # the distill service's model


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def kinema(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    """The CLI as its own process, as a user runs it: what `stack up` starts must outlive it."""
    return subprocess.run([sys.executable, "-m", "kinema.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (the run folder: every component's names it or its logs)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace") and process_start_time(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A process in a session of its own that answers no probe."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def record(run_dir: Path, *components: Component) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_state(StackState(run_dir=str(run_dir), state="up", created="2026-01-01T00:00:00+00:00",
                           orchestrator="127.0.0.1:1", components=list(components)))  # fmt: skip


def component(name: str, pid: int, address: str, probe: str, start_time: int | None = None) -> Component:
    start = process_start_time(pid) if start_time is None else start_time
    return Component(name=name, pid=pid, start_time=start, address=address, log="", probe=probe)


def test_down_and_status_with_nothing_running(tmp_path, capsys) -> None:
    code, out, err = run(capsys, "stack", "down", "--run-dir", str(tmp_path / "stack"))
    assert code == 0 and "nothing to stop" in out
    code, out, err = run(capsys, "stack", "status", "--run-dir", str(tmp_path / "stack"))
    assert code == 3 and "no stack recorded" in err


def test_status_names_a_dead_component_and_down_stops_the_rest(tmp_path, capsys) -> None:
    run_dir = tmp_path / "stack"
    gone = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    gone.wait()
    with RedisServer(RedisSettings(), log_path=tmp_path / "redis.log") as redis:
        alive = component("redis", redis.pid, redis.url, "redis")
        record(run_dir, alive, component("worker", gone.pid, "kinema-stack@host", "celery", start_time=1))

        code, out, err = run(capsys, "stack", "status", "--run-dir", str(run_dir))
        assert code == 3 and "1 of 2 components are not up: worker (dead)" in err
        lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if line.startswith("  ")}
        assert lines == {"redis": "up", "worker": "dead"}

        code, out, err = run(capsys, "stack", "down", "--run-dir", str(run_dir))
        assert code == 0 and "stopped redis" in err and "stopped worker" in err
        assert not is_running(alive) and redis.poll() is not None
        assert not state_path(run_dir).exists()


def test_a_reused_pid_is_not_ours(tmp_path, sleeper) -> None:
    """A recorded pid whose process started at another time belongs to someone else: not running, never stopped."""
    stranger = component("redis", sleeper.pid, "redis://127.0.0.1:1/0", "redis", start_time=1)
    record(tmp_path, stranger)
    assert not is_running(stranger)
    assert main(["stack", "down", "--run-dir", str(tmp_path)]) == 0
    assert sleeper.poll() is None and not state_path(tmp_path).exists()


def test_up_refuses_when_the_run_dir_has_a_running_stack(tmp_path, sleeper, capsys) -> None:
    record(tmp_path, component("orchestrator", sleeper.pid, "127.0.0.1:1", "grpc"))
    before = state_path(tmp_path).read_text()
    code, _out, err = run(capsys, "stack", "up", "--run-dir", str(tmp_path), "--port", "0")
    assert code == 2 and "already running" in err and "orchestrator" in err
    assert state_path(tmp_path).read_text() == before and not (tmp_path / "logs").exists()
    assert sleeper.poll() is None


def test_up_forgets_a_stack_that_is_no_longer_running(tmp_path, capsys) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    gone.wait()
    record(tmp_path, component("redis", gone.pid, "redis://127.0.0.1:1/0", "redis", start_time=1))
    with socket.socket() as taken:  # then stops at the port check: nothing else starts
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _out, err = run(capsys, "stack", "up", "--run-dir", str(tmp_path), "--port", str(port))
    assert code == 3 and f"127.0.0.1:{port} is taken" in err and "no longer running" in err
    assert not state_path(tmp_path).exists() and not (tmp_path / "logs").exists()


def test_up_stops_what_it_started_when_a_component_fails(tmp_path, capsys) -> None:
    run_dir = tmp_path / "stack"
    code, _out, err = run(capsys, "stack", "up", "--run-dir", str(run_dir), "--port", "0",
                         "--models", str(tmp_path / "no-models"))  # fmt: skip
    assert code == 3 and "triton did not start: model repository" in err and "stopping what was started" in err
    assert (run_dir / "logs" / "redis.log").exists() and (run_dir / "logs" / "s3.log").exists()
    assert not state_path(run_dir).exists() and processes_mentioning(str(run_dir)) == []


@pytest.mark.slow
def test_stack_up_serves_generate_and_jobs_then_down_stops_everything(tmp_path, capsys) -> None:
    run_dir = tmp_path / "stack"
    up = kinema("stack", "up", "--run-dir", str(run_dir), "--port", "0", "--timeout", "240", timeout=600)
    try:
        assert up.returncode == 0, up.stderr
        state = read_state(run_dir)
        assert state is not None and state.state == "up"
        assert stat.S_IMODE(os.stat(state_path(run_dir)).st_mode) == 0o600  # it holds the S3 secret key
        names = [c.name for c in state.components]
        assert sorted(names) == sorted(["redis", "s3", "triton", "text_encoder", "autoencoder", "denoiser", "distill",
                                        "depth", "interpret", "worker", "orchestrator"])  # fmt: skip
        assert sorted(state.metrics) == sorted(["text_encoder", "autoencoder", "denoiser", "distill", "depth",
                                                "interpret", "worker", "orchestrator"])  # fmt: skip
        assert {"denoiser_4step", "depth", "iin_factor", "iin_net2net", "iin_invariance"} <= set(state.triton["models"])
        assert all((run_dir / "logs" / f"{n}.log").is_file() for n in names)
        address = state.orchestrator
        assert up.stdout.splitlines()[-1] == f"export KINEMA_SERVER={address}"
        assert f"orchestrator: {address}" in up.stdout
        assert {os.getpgid(c.pid) for c in state.components} == {c.pid for c in state.components}  # own groups

        code, out, err = run(capsys, "stack", "up", "--run-dir", str(run_dir), "--port", "0")
        assert code == 2 and "already running" in err

        out_png = tmp_path / "cube.png"
        code, out, err = run(capsys, "--server", address, "generate", "a red cube", "--steps", "2", "--size", "32",
                             "-q", "-o", str(out_png))  # fmt: skip
        assert code == 0 and out.split() == [str(out_png)], err
        assert Image.open(out_png).size == (32, 32)

        # The job names the few-step student: the worker reaches the distill service too (its KINEMA_DISTILL_URL).
        code, out, err = run(capsys, "--server", address, "jobs", "submit", "a blue cone", "--steps", "2",
                             "--size", "32", "--denoiser", "denoiser_4step")  # fmt: skip
        assert code == 0, err
        job_png = tmp_path / "job.png"
        code, out, err = run(capsys, "--server", address, "jobs", "watch", out.strip(), "-q", "-o", str(job_png))
        assert code == 0 and out.split() == [str(job_png)], err
        text = Image.open(job_png).text
        assert text["prompt"] == "a blue cone" and json.loads(text["models"])["denoiser"] == STUDENT_SHA
        assert json.loads(text["parameters"])["models"]["denoiser"]["name"] == "denoiser_4step"
        # The worker counts a run when Celery's task signals fire, just after the job's record says completed.
        finished = 'kinema_worker_jobs_finished_total{outcome="succeeded",pipeline="text_to_image"} 1.0'

        def worker_metrics() -> str:
            return urllib.request.urlopen(state.metrics["worker"], timeout=10).read().decode()

        assert wait_until(lambda: finished in worker_metrics(), 10.0), worker_metrics()

        # A run that names the few-step student goes through the orchestrator to the distill service (the
        # orchestrator has KINEMA_DISTILL_URL), which samples it in Triton in its own 4 steps, without guidance.
        with grpc.insecure_channel(address) as channel:
            request = orchestrator_pb2.PipelineRequest(pipeline="text_to_image", prompts=["a red cube"], seed=3,
                                                       width=32, height=32)  # fmt: skip
            request.models["denoiser"].name = "denoiser_4step"
            events = list(orchestrator_pb2_grpc.OrchestratorStub(channel).Generate(
                orchestrator_pb2.GenerateRequest(request=request), timeout=120))  # fmt: skip
        assert [(e.progress.step, e.progress.total) for e in events if e.HasField("progress")] == [
            (1, 4), (2, 4), (3, 4), (4, 4)]  # fmt: skip
        p = events[-1].result.outputs[0].provenance
        assert (p.models["denoiser"].name, p.models["denoiser"].sha256) == ("denoiser_4step", STUDENT_SHA)
        params = json_format.MessageToDict(p.parameters)
        assert (params["steps"], params["guidance"]) == (4, 1)

        # The depth service answers its own clients, through the stack's Triton.
        with grpc.insecure_channel(state.component("depth").address) as channel:
            images = np.zeros((1, 3, 32, 48), np.float32)
            reply = depth_pb2_grpc.DepthStub(channel).Estimate(
                depth_pb2.EstimateRequest(images=tensors.encode(images)), timeout=60
            )
        assert tensors.decode(reply.depth, "depth").shape == (1, 1, 32, 48) and reply.model.name == "depth"

        # So does the interpret service: images through the stack's vector_ae_encoder, then iin_factor, in Triton.
        with grpc.insecure_channel(state.component("interpret").address) as channel:
            images = np.zeros((1, 3, 64, 64), np.float32)
            analysis = interpret_pb2_grpc.InterpretStub(channel).Analyze(
                interpret_pb2.AnalyzeRequest(images=tensors.encode(images)), timeout=60
            )
        assert [f.factor for f in analysis.factors] == ["colour", "shape", "position", "size"]
        scores = tensors.decode(analysis.factors[0].scores, "scores")  # (1, 6): the colours
        assert scores.shape == (1, 6) and np.isclose(scores.sum(), 1.0, atol=1e-5)
        assert (analysis.model.name, analysis.autoencoder.name) == ("iin_factor", "vector_ae")

        status = kinema("stack", "status", "--run-dir", str(run_dir), timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        rows = [line.split() for line in status.stdout.splitlines() if line.startswith("  ")]
        assert sorted(r[0] for r in rows) == sorted(names) and {r[1] for r in rows} == {"up"}
        assert "distill" in [r[0] for r in rows]
    finally:
        down = kinema("stack", "down", "--run-dir", str(run_dir), timeout=180)
    assert down.returncode == 0, down.stderr
    assert all(f"stopped {n}" in down.stderr for n in names)
    assert not state_path(run_dir).exists()
    assert [c.name for c in state.components if is_running(c)] == []
    assert processes_mentioning(str(run_dir)) == []
    again = kinema("stack", "down", "--run-dir", str(run_dir), timeout=60)
    assert again.returncode == 0 and "nothing to stop" in again.stdout
