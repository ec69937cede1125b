"""Render charts/kinema with the real helm binary (installed by `make`, see the Makefile's $(BIN)/helm)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kinema"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
HELM = Path(sys.executable).parent / "helm"
RELEASE = "kin"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not HELM.is_file():
        pytest.fail(f"no helm at {HELM}: `make test` installs it (make {HELM.relative_to(REPO)})")
    scratch = REPO / ".cache" / "helm-home"
    env = os.environ | {f"HELM_{k}_HOME": str(scratch / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}
    proc = subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@functools.cache
def _render(values: tuple[str, ...], sets: tuple[str, ...], api_versions: tuple[str, ...]) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", "kinema"]
    for v in values:
        args += ["-f", v]
    for s in sets:
        args += ["--set", s]
    for a in api_versions:
        args += ["--api-versions", a]
    return helm(*args).stdout


def render(*values: Path | str, sets: tuple[str, ...] = (), api_versions: tuple[str, ...] = ()) -> list[dict]:
    """The manifests `helm template` renders with these values files and --set flags (cached)."""
    text = _render(tuple(str(v) for v in values), tuple(sets), tuple(api_versions))
    return [d for d in yaml.safe_load_all(text) if d]


def render_error(*values: Path | str, sets: tuple[str, ...] = ()) -> str:
    """helm template's error output for values it must refuse."""
    args = ["template", RELEASE, str(CHART)]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    proc = helm(*args, check=False)
    assert proc.returncode != 0, f"helm rendered values it should refuse: {values} {sets}"
    return proc.stderr


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def component(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    """name -> the env entry (with `value` or `valueFrom`)."""
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(params=CI_VALUES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def ci_values(request) -> Path:
    return request.param
