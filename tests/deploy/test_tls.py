"""TLS in the chart (docs/deploy.md#tls): the Secrets reach the processes as the KINEMA_* TLS settings, each file where
a mounted Secret puts it; the probes of a TLS server ask its plaintext health-only port; Triton takes mTLS flags."""

from __future__ import annotations

import pytest

from kinema.rpc.settings import ServiceSettings

from .conftest import CHART, CI_VALUES, by_kind, component, containers, env_of, render, render_error

TLS = CHART / "ci" / "tls-values.yaml"
ORCHESTRATED = {"text-encoder", "autoencoder", "denoiser", "distill"}  # what the orchestrator and workers call
KEY_OF = {"CERT_FILE": "tls.crt", "KEY_FILE": "tls.key", "CA_FILE": "ca.crt"}  # cert-manager's Secret layout


def _deployments(docs: list[dict]) -> dict[str, dict]:
    return {component(d): d for d in by_kind(docs, "Deployment").values()}


def _secret_file(deployment: dict, path: str) -> tuple[str, str]:
    """(Secret name, key) that the file at `path` in the first container comes from, through its mounts."""
    (c, *_) = containers(deployment)
    pod = deployment["spec"]["template"]["spec"]
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True, path
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return volume["secret"]["secretName"], path.rsplit("/", 1)[1]


def _tls_env(deployment: dict) -> dict[str, str]:
    return {k: e["value"] for k, e in env_of(containers(deployment)[0]).items() if "TLS" in k or "HEALTH" in k}


def test_without_tls_values_nothing_changes() -> None:
    for name, d in _deployments(render(CI_VALUES[0])).items():
        assert not _tls_env(d), name
        assert "health" not in {p["name"] for p in containers(d)[0].get("ports", [])}, name


def test_each_tls_setting_names_a_file_of_the_right_secret() -> None:
    deployments = _deployments(render(TLS))
    mtls = _orchestrated(deployments)  # the services the orchestrator and workers call
    assert mtls >= ORCHESTRATED
    models = {n for n, d in deployments.items() if "KINEMA_TRITON_URL" in env_of(containers(d)[0])}
    for name, d in deployments.items():
        env = _tls_env(d)
        settings = ServiceSettings.from_env(env)  # the combinations parse as the process parses them
        assert bool(settings.tls_cert_file) == (name in mtls | {"orchestrator"}), name
        assert bool(settings.tls_client_ca_file) == (name in mtls), name
        # Clients of the model services, and (internalTls.triton) every model service as Triton's client.
        assert bool(settings.internal_tls_cert_file) == (name in models | {"orchestrator", "worker"}), name
        for var, path in env.items():
            if var.endswith("_FILE"):
                public = name == "orchestrator" and var.startswith("KINEMA_TLS_")
                key = next(f for end, f in KEY_OF.items() if var.endswith(end))
                assert _secret_file(d, path) == ("kinema-api-tls" if public else "kinema-internal-tls", key), var


def _orchestrated(deployments: dict[str, dict]) -> set[str]:
    """The services whose address the orchestrator's settings hold (kinema.orchestratedServices)."""
    env = env_of(containers(deployments["orchestrator"])[0])
    return {k.removeprefix("KINEMA_").removesuffix("_URL").lower().replace("_", "-") for k in env
            if k.endswith("_URL") and k not in ("KINEMA_REDIS_URL", "KINEMA_TRITON_URL")}  # fmt: skip


def test_tls_servers_are_probed_on_their_plaintext_health_port() -> None:
    deployments = _deployments(render(TLS))
    secured = _orchestrated(deployments) | {"orchestrator"}
    for name, d in deployments.items():
        c = containers(d)[0]
        env = env_of(c)
        if "KINEMA_PORT" not in env:
            continue
        settings = ServiceSettings.from_env({k: e["value"] for k, e in env.items() if "value" in e})
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        probe_port = settings.health_port if name in secured else settings.port
        assert bool(settings.tls_cert_file) == (name in secured) == bool(settings.health_port), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": probe_port}, f"{name} {probe}"
        if name in secured:
            assert ports["health"] == settings.health_port != settings.port


def test_triton_serves_grpc_over_mtls_and_keeps_http_probes() -> None:
    deployments = _deployments(render(TLS))
    (t,) = containers(deployments["triton"])
    flags = dict(a.split("=", 1) for a in t["args"] if a.startswith("--grpc-"))
    assert flags.pop("--grpc-use-ssl-mutual") == "true"
    files = {flag: _secret_file(deployments["triton"], path) for flag, path in flags.items() if flag != "--grpc-port"}
    assert files == {"--grpc-server-cert": ("kinema-internal-tls", "tls.crt"),
                     "--grpc-server-key": ("kinema-internal-tls", "tls.key"),
                     "--grpc-root-cert": ("kinema-internal-tls", "ca.crt")}  # fmt: skip
    assert t["livenessProbe"]["httpGet"]["port"] == "http"
    plain = _deployments(render(TLS, sets=("internalTls.triton=false",)))  # mTLS among the services only
    assert not [a for a in containers(plain["triton"])[0]["args"] if "ssl" in a]
    assert "KINEMA_INTERNAL_TLS_CA_FILE" not in env_of(containers(plain["interpret"])[0])


def test_the_chart_makes_no_tls_secret_of_its_own() -> None:
    assert not {"kinema-api-tls", "kinema-internal-tls"} & set(by_kind(render(TLS), "Secret"))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("internalTls.triton=true",), "internalTls.triton needs internalTls.existingSecret"),
        (("internalTls.existingSecret=Bad_Name",), "Does not match pattern"),
        (("orchestrator.tls.secret=x",), "Additional property secret is not allowed"),
    ],
)
def test_tls_values_the_chart_refuses(sets, message) -> None:
    assert message in render_error(sets=sets)
