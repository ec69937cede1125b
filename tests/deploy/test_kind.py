"""e2e/kind/run.sh cannot run here (no Docker engine): it is shellcheck-clean, refuses to pass without Docker, and
port-forwards Services the chart really renders with its CPU profile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import CHART, REPO, by_kind, render

SCRIPT = REPO / "e2e" / "kind" / "run.sh"
BIN = Path(sys.executable).parent


def test_shellcheck():
    proc = subprocess.run([str(BIN / "shellcheck"), str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_stops_with_a_clear_message_where_docker_or_kind_is_missing(tmp_path):
    # A PATH with bash and the core tools only: no docker, kind or kubectl.
    env = {k: v for k, v in os.environ.items() if k != "PATH"} | {"PATH": "/usr/bin:/bin", "HELM": str(BIN / "helm")}
    env["KIND_LOGS"] = str(tmp_path)
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0
    assert re.search(r"'(docker|kind|kubectl)' is not installed", proc.stderr), proc.stderr


def test_forwards_services_the_chart_renders():
    text = SCRIPT.read_text()
    services = by_kind(render(CHART / "ci" / "cpu-values.yaml"), "Service")
    release = re.search(r"KINEMA_RELEASE:-(\w+)", text)[1]
    for svc, remote in re.findall(r'port_forward "svc/\$name-([a-z-]+)" \d+:(\d+)', text):
        name = f"kin-kinema-{svc}"  # the tests render release "kin"; run.sh installs "$release" (= its own name)
        assert name in services, f"run.sh forwards {svc}, which the chart does not render"
        assert int(remote) in {p["port"] for p in services[name]["spec"]["ports"]}
    assert release == "kinema" and "ci/cpu-values.yaml" in text and "pytest e2e" in text
    assert "artifacts" in text and "127.0.0.1:9000" in (CHART / "ci" / "cpu-values.yaml").read_text()
