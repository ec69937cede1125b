"""The Dockerfiles (no Docker engine here): copied paths exist, entrypoints match how the local stack starts each
process, the slim images hold every package their entrypoints import, and hadolint passes."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from kinema.inference.model_config import latest_version, parameters, read_config
from kinema.jobs.celery_app import CeleryWorker, WorkerSettings
from kinema.rpc.process import SERVED_MODELS
from kinema.stack import MODEL_SERVICES, WORKER_APP
from kinema.tritonserver import TritonServer, TritonSettings, _Install

from .conftest import CI_VALUES, REPO, by_kind, component, containers, render

SERVICES = ("text_encoder", "autoencoder", "denoiser", "distill", "depth", "interpret", "orchestrator")
DOCKERFILES = [REPO / "services" / s / "Dockerfile" for s in SERVICES]
DOCKERFILES += [REPO / "services" / "orchestrator" / "worker.Dockerfile", REPO / "services" / "triton" / "Dockerfile"]
BIN = Path(sys.executable).parent


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(s for s in path.read_text().splitlines() if not s.lstrip().startswith("#")))
    return [(m[0].upper(), m[1].strip()) for m in re.findall(r"^(\w+)\s+(.*)$", text, re.M)]


def exec_form(args: str) -> list[str]:
    return json.loads(args)


def arg(path: Path, name: str) -> str:
    (value,) = [a.split("=", 1)[1] for i, a in instructions(path) if i == "ARG" and a.startswith(f"{name}=")]
    return value.strip('"')


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_copied_paths_exist_and_the_image_runs_as_uid_10001(path):
    ignored = (REPO / ".dockerignore").read_text().split()
    for instr, args in instructions(path):
        if instr == "COPY" and "--from=" not in args:
            *sources, _ = shlex.split(args)
            for s in sources:
                assert (REPO / s).exists(), f"{path}: COPY {s}: no such path in the build context"
                assert s.rstrip("/") not in ignored, f"{path}: COPY {s}, which .dockerignore leaves out"
    users = [a for i, a in instructions(path) if i == "USER"]
    assert users and users[-1] == "10001", f"{path} must end as the non-root uid the chart runs it as"


@pytest.mark.parametrize("name", SERVICES)
def test_service_images_start_the_service_as_the_local_stack_does(name):
    # kinema.rpc.process.ServiceProcess: [sys.executable, "-m", f"services.{name}"] from the repository root
    cmd = [exec_form(a) for i, a in instructions(REPO / "services" / name / "Dockerfile") if i == "CMD"][-1]
    assert cmd == ["python", "-m", f"services.{name}"]
    assert (REPO / "services" / name / "__main__.py").is_file()
    assert name in (*MODEL_SERVICES, "orchestrator")


def test_worker_image_starts_celery_as_the_local_stack_does():
    path = REPO / "services" / "orchestrator" / "worker.Dockerfile"
    cmd = [exec_form(a) for i, a in instructions(path) if i == "CMD"][-1]
    stack = CeleryWorker(WorkerSettings(app=WORKER_APP, broker_url="redis://x", backend_url="redis://x",
                                        concurrency=2, name="kinema"))._command()  # fmt: skip
    assert stack[:3] == [sys.executable, "-m", "celery"]
    # the same arguments, but the node name: `kinema@%h` is the pod's name, which the liveness probe pings
    assert [a for a in cmd[1:] if not a.startswith("--hostname")] == [
        a for a in stack[3:] if not a.startswith("--hostname")
    ]
    (worker,) = [d for d in by_kind(render(CI_VALUES[0]), "Deployment").values() if component(d) == "worker"]
    assert containers(worker)[0]["command"] == cmd


def test_triton_image_and_chart_start_tritonserver_as_the_local_stack_does():
    path = REPO / "services" / "triton" / "Dockerfile"
    assert arg(path, "TRITON_IMAGE") == "nvcr.io/nvidia/tritonserver:24.10-py3"
    entry = [exec_form(a) for i, a in instructions(path) if i == "ENTRYPOINT"][-1]
    cmd = [exec_form(a) for i, a in instructions(path) if i == "CMD"][-1]
    install = _Install(root=Path("/opt/tritonserver"), libs=Path("/opt/tritonserver/lib"))
    triton = TritonServer(TritonSettings(models=Path("/models"), models_to_load=SERVED_MODELS))
    stack = triton._command(install)
    assert Path(stack[0]).name == entry[0] == "tritonserver"
    # what the stack sets besides paths, addresses and ports (which differ in a pod by design)
    local = {a for a in stack[1:] if not a.startswith(("--backend-directory", "--cache-directory", "--http",
                                                       "--grpc", "--metrics", "--model-repository"))}  # fmt: skip
    local |= {f"--load-model={m}" for m in SERVED_MODELS}  # the stack's TritonSettings(models_to_load=SERVED_MODELS)
    assert local == {a for a in cmd if not a.startswith("--model-repository")}
    (pod,) = [d for d in by_kind(render(CI_VALUES[0]), "Deployment").values() if component(d) == "triton"]
    assert local <= set(containers(pod)[0]["args"])


def _blocked_modules(dists: set[str]) -> list[str]:
    norm = {d.lower().replace("_", "-") for d in dists}
    return sorted(m for m, ds in packages_distributions().items()
                  if any(d.lower().replace("_", "-") in norm for d in ds) and m.isidentifier())  # fmt: skip


def _run_blocked(blocked: list[str], code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    prelude = f"import sys\nfor m in {blocked!r}:\n    sys.modules[m] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=(env or {}) | {"PATH": str(BIN), "PYTHONPATH": str(REPO),
                                                          "HF_HUB_OFFLINE": "1"})  # fmt: skip


def test_service_images_hold_every_package_the_entrypoints_import():
    excluded = set(arg(DOCKERFILES[0], "EXCLUDE").split("|"))
    for path in DOCKERFILES[1 : len(SERVICES)]:
        assert set(arg(path, "EXCLUDE").split("|")) == excluded
    blocked = _blocked_modules(excluded)
    assert "transformers" in blocked and "pytriton" in blocked
    env = {"KINEMA_TEXT_ENCODER_URL": "a:1", "KINEMA_DENOISER_URL": "a:1", "KINEMA_AUTOENCODER_URL": "a:1",
           "KINEMA_ARTIFACTS": "s3://b?endpoint=x:9000", "KINEMA_REDIS_URL": "redis://x:6379/0"}  # fmt: skip
    modules = [f"services.{s}.server" for s in SERVICES] + ["services.orchestrator.worker"]
    proc = _run_blocked(blocked, f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n", env)
    assert proc.returncode == 0, f"an entrypoint imports a package the service images leave out:\n{proc.stderr}"


def test_triton_image_holds_every_package_the_served_networks_load():
    path = REPO / "services" / "triton" / "Dockerfile"
    included = {"torch", *arg(path, "INCLUDE").split("|"), *arg(path, "INCLUDE_NO_DEPS").split("|")}
    pinned = {re.split(r"[=<>\[ ]", line)[0] for line in (REPO / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")}  # fmt: skip
    assert included <= pinned
    blocked = _blocked_modules(pinned - included - {"tqdm"})  # tqdm: a dependency of tokenizers' hub client
    # Each config's parameters as Triton hands them to model.py, read here (tritonclient's config proto is not in the
    # image): parsed by protobuf, so an escaped params_json (the IIN configs') arrives as the JSON the network checks.
    params = {name: parameters(read_config(REPO / "models" / name)) for name in SERVED_MODELS}
    versions = {name: latest_version(REPO / "models" / name) for name in SERVED_MODELS}
    code = f"""
from pathlib import Path
from kinema.inference.networks import load_network
params, versions = {params!r}, {versions!r}
for name, p in params.items():
    load_network(p.get("network", name), Path("models", name, versions[name]), p)
"""
    proc = _run_blocked(blocked, code)
    assert proc.returncode == 0, f"a network needs a package the Triton image leaves out:\n{proc.stderr}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint(path):
    proc = subprocess.run([str(BIN / "hadolint"), str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_worker_image_adds_what_model_jobs_train_and_score_with():
    """The worker runs distillations and IIN fittings, which load MiniLM and the attribute probe: the orchestrator
    image's EXCLUDE leaves their packages out, the worker image puts them back at requirements.txt's pins, and a
    fitting's data, encoder, probe and text encoder load with only them."""
    path = REPO / "services" / "orchestrator" / "worker.Dockerfile"
    added = arg(path, "JOB_PACKAGES").split("|")
    excluded = set(arg(DOCKERFILES[0], "EXCLUDE").split("|"))
    assert set(added) <= excluded
    pins = {line.split("==")[0] for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line}
    assert set(added) <= pins
    runs = " ".join(a for i, a in instructions(path) if i == "RUN")
    assert "/tmp/requirements.txt" in runs and "$JOB_PACKAGES" in runs
    blocked = _blocked_modules(excluded - set(added))
    code = (
        "import torch\nfrom kinema.repository import load_text_encoder_default as load\nload().encode(['a red cube'])\n"
        "from kinema.orchestration.fitting import register_fitting\n"
        "from kinema.train import iin\nraw = iin.render_single_objects('test', 0, 2)\n"
        "iin.load_representation('vector_ae', iin.Path('models'))\n"
        "from kinema.eval.probe import Probe\nProbe.from_file().detect(list(raw['images']))\n"
        "print(iin.probe_features(torch.from_numpy(raw['images'])).shape)\n"
    )
    proc = _run_blocked(blocked, code)
    assert proc.returncode == 0, f"the worker image misses a package a model job loads:\n{proc.stderr}"
