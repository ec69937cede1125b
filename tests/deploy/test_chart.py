"""charts/kinema with the real helm: lint, Kubernetes schemas 1.29-1.33, and what every manifest must hold."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from kinema.orchestration import settings as orchestration_settings
from kinema.rpc import settings as rpc_settings
from kinema.rpc.settings import ServiceSettings
from kinema.stack import MODEL_SERVICES
from kinema.storage.artifacts import ENV_ACCESS_KEY, ENV_SECRET_KEY, store_from_uri
from kinema.tritonserver import PIN_CPUS_SETTING, RATE_LIMIT

from .conftest import (
    CHART,
    CI_VALUES,
    RELEASE,
    REPO,
    SERVICE_MONITOR_API,
    by_kind,
    component,
    containers,
    env_of,
    helm,
    render,
    render_error,
)

KUBERNETES = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
# What the Kinema processes read (the settings code), plus what Celery and Triton's S3 repository read.
KINEMA_VARS = set(rpc_settings.ENV_VARS.values()) | set(orchestration_settings.ENV_VARS.values())
KINEMA_VARS |= {ENV_ACCESS_KEY, ENV_SECRET_KEY, PIN_CPUS_SETTING}  # the last: Triton's model instances
OTHER_VARS = {"OMP_NUM_THREADS", "HOME", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MINIO_BROWSER",
              "REDIS_PASSWORD"}  # fmt: skip
GRPC_PORT = ServiceSettings.from_env({"KINEMA_PORT": "50051"}).port


def test_lint_strict(ci_values):
    out = helm("lint", "--strict", str(CHART), "-f", str(ci_values)).stdout
    assert "0 chart(s) failed" in out


def test_lint_strict_with_defaults():
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART)).stdout


@pytest.mark.parametrize("version", KUBERNETES)
def test_manifests_validate_against_kubernetes(ci_values, version):
    for doc in render(ci_values):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {e.message}") from None


def test_every_resource_has_the_standard_labels(ci_values):
    for doc in render(ci_values, api_versions=(SERVICE_MONITOR_API,)):
        labels = doc["metadata"].get("labels", {})
        release_wide = doc["kind"] == "NetworkPolicy" and "app.kubernetes.io/component" not in labels
        needed = [k for k in STANDARD_LABELS if not (release_wide and k == "app.kubernetes.io/component")]
        missing = [k for k in needed if k not in labels]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE


def test_every_container_has_probes_resources_and_runs_as_non_root(ci_values):
    deployments = by_kind(render(ci_values), "Deployment")
    assert deployments
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        assert (
            d["spec"]["template"]["metadata"]["labels"] | d["spec"]["selector"]["matchLabels"]
            == (d["spec"]["template"]["metadata"]["labels"])
        ), f"{name}: its selector does not select its own pods"
        for c in pod["containers"]:
            where = f"{name}/{c['name']}"
            assert "readinessProbe" in c and "livenessProbe" in c, f"{where} has no readiness/liveness probe"
            assert c["resources"].get("requests", {}).get("memory"), f"{where} requests no memory"
            assert c["resources"].get("limits", {}).get("memory"), f"{where} has no memory limit"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert c.get("runAsUser", 1) != 0, where


def test_grpc_servers_use_native_grpc_probes_on_their_serving_port():
    for name, d in by_kind(render(CI_VALUES[0]), "Deployment").items():
        c = containers(d)[0]
        env = env_of(c)
        if "KINEMA_PORT" not in env:
            continue
        port = int(env["KINEMA_PORT"]["value"])
        assert port == GRPC_PORT
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == port, name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, f"{name} {probe}"
        assert env["KINEMA_HOST"]["value"] == "0.0.0.0", f"{name} would listen on loopback only"
        metrics = int(env["KINEMA_METRICS_PORT"]["value"])
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == metrics, name


def test_services_select_their_deployments_and_target_real_ports(ci_values):
    docs = render(ci_values)
    deployments = by_kind(docs, "Deployment")
    for name, svc in by_kind(docs, "Service").items():
        selector = svc["spec"]["selector"]
        matches = [d for d in deployments.values()
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]  # fmt: skip
        assert len(matches) == 1, f"Service {name} selects {len(matches)} Deployments"
        ports = {p["name"]: p["containerPort"] for c in containers(matches[0]) for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"Service {name} targets {p['targetPort']}, not a container port"
        assert component(svc) == component(matches[0])


def test_every_env_var_is_one_a_process_reads(ci_values):
    for name, d in by_kind(render(ci_values), "Deployment").items():
        for c in containers(d):
            unknown = set(env_of(c)) - KINEMA_VARS - OTHER_VARS
            assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"


def _workload(docs: list[dict], comp: str) -> dict:
    (d,) = [d for d in by_kind(docs, "Deployment").values() if component(d) == comp]
    return d


def _with_secrets(docs: list[dict], env: dict[str, dict]) -> dict[str, str]:
    """Env values as the pod sees them, secretKeyRefs resolved from the rendered Secrets."""
    import base64

    secrets = by_kind(docs, "Secret")
    out = {}
    for name, e in env.items():
        if "value" in e:
            out[name] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            if ref["name"] in secrets:
                out[name] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    return out


def test_model_services_get_the_settings_the_local_stack_gives_them():
    docs = render(CI_VALUES[0])
    services = by_kind(docs, "Service")
    for name in MODEL_SERVICES:
        env = _with_secrets(docs, env_of(containers(_workload(docs, name.replace("_", "-")))[0]))
        settings = ServiceSettings.from_env(env)  # parses as the service does, or raises naming the variable
        assert settings.backend == "triton"
        host, port = settings.triton_url.rsplit(":", 1)
        assert host in services and component(services[host]) == "triton"
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"] if p["name"] == "grpc"}


@pytest.mark.parametrize("profile", ["cpu", "external-s3", "minimal"])
def test_orchestrator_and_worker_settings_parse_and_point_at_real_services(profile):
    from kinema.orchestration.settings import OrchestratorSettings

    docs = render(CHART / "ci" / f"{profile}-values.yaml")
    services = by_kind(docs, "Service")
    comps = ["orchestrator"] + (["worker"] if profile != "minimal" else [])
    for comp in comps:
        env = _with_secrets(docs, env_of(containers(_workload(docs, comp))[0]))
        if profile == "external-s3":  # keys and Redis URL live in the platform's Secrets
            env |= {ENV_ACCESS_KEY: "k", ENV_SECRET_KEY: "s", "KINEMA_REDIS_URL": "redis://redis.example:6380/0"}
        settings = OrchestratorSettings.from_env(environ=env)
        for capability, address in settings.addresses.items():
            host, port = address.rsplit(":", 1)
            assert component(services[host]) == capability.replace("_", "-")
            assert int(port) == GRPC_PORT
        store = store_from_uri(settings.artifacts, settings.s3_access_key, settings.s3_secret_key)
        assert store.bucket
        assert settings.jobs_enabled is (profile != "minimal")
        if profile == "cpu":
            minio = services[store.endpoint.rsplit(":", 1)[0]]
            assert component(minio) == "minio" and not store.secure
            redis_host = settings.redis_url.rsplit("@", 1)[1].split(":")[0]
            assert component(services[redis_host]) == "redis"
        if comp == "worker":  # Celery's own variables name the same Redis
            raw = env_of(containers(_workload(docs, comp))[0])
            assert raw["CELERY_BROKER_URL"] == raw["CELERY_RESULT_BACKEND"] | {"name": "CELERY_BROKER_URL"}
            assert raw["CELERY_BROKER_URL"]["valueFrom"] == raw["KINEMA_REDIS_URL"]["valueFrom"]


def test_every_enabled_model_service_reaches_the_orchestrator_as_kinema_name_url():
    docs = render(CI_VALUES[0], sets=("services.denoiser.enabled=false",))
    env = env_of(containers(_workload(docs, "orchestrator"))[0])
    assert "KINEMA_TEXT_ENCODER_URL" in env and "KINEMA_AUTOENCODER_URL" in env
    assert "KINEMA_DENOISER_URL" not in env
    assert not [d for d in by_kind(docs, "Deployment").values() if component(d) == "denoiser"]


# The model services the orchestrator calls: the KINEMA_<NAME>_URL variables its settings read. The chart sets every
# one of them; KINEMA_DISTILL_URL and KINEMA_DEPTH_URL are optional to the settings (no students, no edit_video
# without them), so the chart leaves one out exactly when its services.<name>.enabled=false.
OPTIONAL_URLS = {"KINEMA_DISTILL_URL", "KINEMA_DEPTH_URL"}
ORCHESTRATED_URLS = {var for var in orchestration_settings.ENV_VARS.values() if var.endswith("_URL")
                     and var not in ("KINEMA_REDIS_URL", "KINEMA_BROKER_URL")}  # fmt: skip


@pytest.mark.parametrize("profile", ["cpu", "gpu", "minimal"])
def test_the_orchestrator_and_worker_get_exactly_the_service_urls_their_settings_read(profile):
    docs = render(CHART / "ci" / f"{profile}-values.yaml")
    deployed = {component(d) for d in by_kind(docs, "Deployment").values()}
    assert {s.replace("_", "-") for s in MODEL_SERVICES} <= deployed  # depth and interpret included
    for comp in ("orchestrator", "worker") if profile != "minimal" else ("orchestrator",):
        env = env_of(containers(_workload(docs, comp))[0])
        urls = {v for v in env if v.startswith("KINEMA_") and v.endswith("_URL")} - {"KINEMA_REDIS_URL"}
        assert urls == ORCHESTRATED_URLS, f"{comp}: the chart's kinema.orchestratedServices drifted from its settings"
        assert "KINEMA_INTERPRET_URL" not in env  # it answers its own clients only


def test_the_orchestrator_and_worker_reach_the_distill_service_for_students():
    """KINEMA_DISTILL_URL names the distill Service's gRPC port for both callers (a job runs the same pipeline as
    Generate); with services.distill.enabled=false there is no distill Deployment and the variable is unset, which
    the settings take as "no students" (the other URLs stay required)."""
    docs = render(CI_VALUES[0])
    services = by_kind(docs, "Service")
    for comp in ("orchestrator", "worker"):
        env = env_of(containers(_workload(docs, comp))[0])
        host, port = env["KINEMA_DISTILL_URL"]["value"].rsplit(":", 1)
        assert component(services[host]) == "distill" and int(port) == GRPC_PORT
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"] if p["name"] == "grpc"}
    without = render(CI_VALUES[0], sets=("services.distill.enabled=false",))
    assert not [d for d in by_kind(without, "Deployment").values() if component(d) == "distill"]
    for comp in ("orchestrator", "worker"):
        env = env_of(containers(_workload(without, comp))[0])
        urls = {v for v in env if v.startswith("KINEMA_") and v.endswith("_URL")} - {"KINEMA_REDIS_URL"}
        assert urls == ORCHESTRATED_URLS - {"KINEMA_DISTILL_URL"}, comp


def test_the_orchestrator_and_worker_reach_the_depth_service_for_edit_video():
    """KINEMA_DEPTH_URL names the depth Service's gRPC port for both callers (edit_video's structure); with
    services.depth.enabled=false it is unset, which the settings take as "no edit_video" (FAILED_PRECONDITION)."""
    docs = render(CI_VALUES[0])
    services = by_kind(docs, "Service")
    for comp in ("orchestrator", "worker"):
        host, port = env_of(containers(_workload(docs, comp))[0])["KINEMA_DEPTH_URL"]["value"].rsplit(":", 1)
        assert component(services[host]) == "depth" and int(port) == GRPC_PORT
    without = render(CI_VALUES[0], sets=("services.depth.enabled=false",))
    for comp in ("orchestrator", "worker"):
        env = env_of(containers(_workload(without, comp))[0])
        urls = {v for v in env if v.startswith("KINEMA_") and v.endswith("_URL")} - {"KINEMA_REDIS_URL"}
        assert urls == ORCHESTRATED_URLS - {"KINEMA_DEPTH_URL"}, comp


def test_the_distill_service_calls_triton_for_the_student():
    docs = render(CI_VALUES[0])
    settings = ServiceSettings.from_env(_with_secrets(docs, env_of(containers(_workload(docs, "distill"))[0])))
    assert settings.backend == "triton" and settings.port == GRPC_PORT
    triton = containers(_workload(docs, "triton"))[0]
    assert "--load-model=denoiser_4step" in triton["args"]
    assert "denoiser_4step" in triton["readinessProbe"]["exec"]["command"]


def test_the_depth_service_calls_triton_for_the_depth_model():
    docs = render(CI_VALUES[0])
    env = _with_secrets(docs, env_of(containers(_workload(docs, "depth"))[0]))
    settings = ServiceSettings.from_env(env)
    assert settings.backend == "triton" and settings.port == GRPC_PORT
    triton = containers(_workload(docs, "triton"))[0]
    assert "--load-model=depth" in triton["args"] and "depth" in triton["readinessProbe"]["exec"]["command"]


def test_the_interpret_service_calls_triton_for_the_iin_models_and_the_autoencoder():
    """Interpret reaches every model it calls (kinema.inference.interpreter: iin_*, and for images the autoencoder each
    names: vector_ae_encoder / _decoder, vae_encoder / _decoder) through the one Triton its settings name; Triton
    loads them all and is ready only with them."""
    docs = render(CI_VALUES[0])
    settings = ServiceSettings.from_env(_with_secrets(docs, env_of(containers(_workload(docs, "interpret"))[0])))
    assert settings.backend == "triton" and settings.port == GRPC_PORT
    triton = containers(_workload(docs, "triton"))[0]
    for model in (
        "iin_factor",
        "iin_net2net",
        "iin_invariance",
        "vae_encoder",
        "vae_decoder",
        "vector_ae_encoder",
        "vector_ae_decoder",
    ):
        assert f"--load-model={model}" in triton["args"] and model in triton["readinessProbe"]["exec"]["command"]
    without = render(CI_VALUES[0], sets=("services.interpret.enabled=false",))
    assert not [d for d in by_kind(without, "Deployment").values() if component(d) == "interpret"]


def test_the_worker_serves_its_job_metrics_behind_a_service():
    docs = render(CI_VALUES[0])
    (c,) = containers(_workload(docs, "worker"))
    settings = ServiceSettings.from_env(_with_secrets(docs, env_of(c)))  # as services/orchestrator/worker.py reads it
    assert settings.host == "0.0.0.0" and settings.metrics_port
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": settings.metrics_port}
    assert "KINEMA_PORT" not in env_of(c)  # no gRPC API: the celery ping probes stay
    (svc,) = [s for s in by_kind(docs, "Service").values() if component(s) == "worker"]
    assert [(p["name"], p["targetPort"]) for p in svc["spec"]["ports"]] == [("metrics", "metrics")]
    assert not [s for s in by_kind(render(CHART / "ci" / "minimal-values.yaml"), "Service").values()
                if component(s) == "worker"]  # fmt: skip


def test_the_gpu_profile_loads_each_models_gpu_config():
    from kinema.inference.model_config import GPU_CONFIG, config_path

    cpu = containers(_workload(render(CI_VALUES[0]), "triton"))[0]["args"]
    assert not [a for a in cpu if a.startswith("--model-config-name")]
    gpu = containers(_workload(render(CHART / "ci" / "gpu-values.yaml"), "triton"))[0]["args"]
    assert f"--model-config-name={GPU_CONFIG}" in gpu
    models = [a.split("=", 1)[1] for a in gpu if a.startswith("--load-model=")]
    assert models and all(config_path(REPO / "models" / m, GPU_CONFIG).is_file() for m in models), models
    default = containers(_workload(render(sets=("triton.gpu.enabled=true",)), "triton"))[0]["args"]
    assert "--model-config-name=gpu" in default
    plain = render(sets=("triton.gpu.enabled=true", "triton.gpu.modelConfigName="))
    (g,) = containers(_workload(plain, "triton"))
    assert not [a for a in g["args"] if a.startswith("--model-config-name")]
    assert g["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_admission_and_prompt_limits_reach_the_processes_that_read_them():
    """orchestrator.maxInFlight / maxQueuedJobs, services.<name>.maxInFlight and maxPromptChars arrive as the
    KINEMA_* variables their settings parse (a million as 1000000, not 1e+06); the chart's defaults are the code's."""
    from kinema.orchestration.settings import OrchestratorSettings

    def settings(docs: list[dict]) -> dict[str, ServiceSettings | OrchestratorSettings]:
        out: dict[str, ServiceSettings | OrchestratorSettings] = {}
        for d in by_kind(docs, "Deployment").values():
            env = _with_secrets(docs, env_of(containers(d)[0]))
            if component(d) == "orchestrator":
                out["orchestrator"] = OrchestratorSettings.from_env(environ=env)
            elif component(d).replace("-", "_") in MODEL_SERVICES:
                out[component(d).replace("-", "_")] = ServiceSettings.from_env(env)
        return out

    def raw(docs: list[dict], comp: str) -> dict[str, dict]:
        return env_of(containers(_workload(docs, comp))[0])

    docs = render(CI_VALUES[0])
    defaults = settings(docs)
    orchestrator = defaults.pop("orchestrator")
    assert orchestrator.service.max_in_flight == ServiceSettings.max_in_flight
    assert orchestrator.max_queued_jobs == OrchestratorSettings.max_queued_jobs
    assert orchestrator.service.max_prompt_chars == ServiceSettings.max_prompt_chars
    assert {s.max_in_flight for s in defaults.values()} == {ServiceSettings.max_in_flight}
    assert "KINEMA_MAX_PROMPT_CHARS" in raw(docs, "text-encoder")  # where prompts enter, and only there
    assert "KINEMA_MAX_PROMPT_CHARS" not in raw(docs, "depth")
    assert not {"KINEMA_MAX_IN_FLIGHT", "KINEMA_MAX_QUEUED_JOBS"} & set(raw(docs, "worker"))  # it serves no calls

    sets = ("orchestrator.maxInFlight=4", "orchestrator.maxQueuedJobs=1000000", "services.denoiser.maxInFlight=0",
            "services.depth.maxInFlight=1000000", "maxPromptChars=300")  # fmt: skip
    docs = render(CI_VALUES[0], sets=sets)
    got = settings(docs)
    orchestrator = got.pop("orchestrator")
    assert (orchestrator.service.max_in_flight, orchestrator.max_queued_jobs) == (4, 1_000_000)
    assert raw(docs, "orchestrator")["KINEMA_MAX_QUEUED_JOBS"]["value"] == "1000000"
    assert orchestrator.service.max_prompt_chars == got["text_encoder"].max_prompt_chars == 300
    in_flight = {name: s.max_in_flight for name, s in got.items()}
    assert in_flight == {"text_encoder": 32, "autoencoder": 32, "denoiser": 0, "distill": 32, "depth": 1_000_000,
                         "interpret": 32}  # fmt: skip


def test_generated_secrets_and_existing_secrets():
    docs = render(CI_VALUES[0])
    secrets = by_kind(docs, "Secret")
    assert {f"{RELEASE}-kinema-s3", f"{RELEASE}-kinema-redis"} <= set(secrets)
    external = render(CHART / "ci" / "external-s3-values.yaml")
    assert not by_kind(external, "Secret"), "existingSecret given: the chart must not make its own"
    env = env_of(containers(_workload(external, "orchestrator"))[0])
    assert env[ENV_ACCESS_KEY]["valueFrom"]["secretKeyRef"] == {"name": "kinema-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["KINEMA_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "kinema-redis", "key": "url"}
    kinds = {d["kind"] + "/" + component(d) for d in external if "labels" in d["metadata"] and
             "app.kubernetes.io/component" in d["metadata"]["labels"]}  # fmt: skip
    assert not [k for k in kinds if k.endswith(("/minio", "/redis"))], "external S3/Redis: no MinIO or Redis"


def test_api_keys_reach_the_orchestrator_as_a_mounted_secret_file_when_asked_for():
    plain = env_of(containers(_workload(render(CI_VALUES[0]), "orchestrator"))[0])
    assert "KINEMA_API_KEYS_FILE" not in plain
    docs = render(CI_VALUES[0], sets=("orchestrator.auth.existingSecret=kinema-keys",))
    pod = _workload(docs, "orchestrator")["spec"]["template"]["spec"]
    (container,) = containers(_workload(docs, "orchestrator"))
    path = env_of(container)["KINEMA_API_KEYS_FILE"]["value"]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] and volume["secret"]["secretName"] == "kinema-keys"
    assert [i["path"] for i in volume["secret"]["items"]] == [path.rsplit("/", 1)[1]]
    assert "kinema-keys" not in by_kind(docs, "Secret"), "the keys Secret is the platform team's, not the chart's"
    for name, d in by_kind(docs, "Deployment").items():  # only the orchestrator checks keys
        if component(d) != "orchestrator":
            assert all("KINEMA_API_KEYS_FILE" not in env_of(c) for c in containers(d)), name


def test_triton_runs_as_the_local_stack_starts_it_with_shm_and_optional_gpu():
    from kinema.rpc.process import SERVED_MODELS

    cpu = _workload(render(CI_VALUES[0]), "triton")
    (c,) = containers(cpu)
    args = c["args"]
    assert {f"--load-model={m}" for m in SERVED_MODELS} <= set(args)
    assert {"--model-control-mode=explicit", "--strict-readiness=false", RATE_LIMIT} <= set(args)
    assert c["readinessProbe"]["exec"]["command"][3:] == list(SERVED_MODELS)
    shm = next(v for v in cpu["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert env_of(c)[PIN_CPUS_SETTING]["value"] == "0"  # cores shared with other pods: placement left to the kernel
    (pinned,) = containers(_workload(render(CI_VALUES[0], sets=("triton.pinCpus=true",)), "triton"))
    assert env_of(pinned)[PIN_CPUS_SETTING]["value"] == "1"

    gpu = _workload(render(CHART / "ci" / "gpu-values.yaml"), "triton")
    (g,) = containers(gpu)
    assert g["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "replicas" not in gpu["spec"], "autoscaled: the HPA owns the replica count"

    s3 = _workload(render(CHART / "ci" / "external-s3-values.yaml"), "triton")
    (t,) = containers(s3)
    assert "--model-repository=s3://s3.eu-central-1.amazonaws.com/kinema-models/models/v1" in t["args"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env_of(t))


def test_hpa_pdb_serviceaccount_per_component():
    docs = render(CHART / "ci" / "gpu-values.yaml")
    hpas = {component(h): h for h in by_kind(docs, "HorizontalPodAutoscaler").values()}
    assert set(hpas) == {"triton", "orchestrator"}
    deployments = {component(d): d for d in by_kind(docs, "Deployment").values()}
    for comp, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployments[comp]["metadata"]["name"]
    for pdb in by_kind(docs, "PodDisruptionBudget").values():
        d = deployments[component(pdb)]
        assert pdb["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    accounts = by_kind(docs, "ServiceAccount")
    for d in deployments.values():
        assert d["spec"]["template"]["spec"]["serviceAccountName"] in accounts


def test_service_monitors_only_where_the_crd_exists():
    assert not by_kind(render(CI_VALUES[0]), "ServiceMonitor")
    monitors = by_kind(render(CI_VALUES[0], api_versions=(SERVICE_MONITOR_API,)), "ServiceMonitor")
    services = {component(s): s for s in by_kind(render(CI_VALUES[0]), "Service").values()}
    assert {component(m) for m in monitors.values()} == {"triton", "orchestrator", "worker", *[
        s.replace("_", "-") for s in MODEL_SERVICES]}  # fmt: skip
    for m in monitors.values():
        svc = services[component(m)]
        assert m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert m["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_ingress_routes_to_the_orchestrator_grpc_port():
    docs = render(CHART / "ci" / "gpu-values.yaml")
    (ingress,) = by_kind(docs, "Ingress").values()
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    svc = by_kind(docs, "Service")[backend["name"]]
    assert component(svc) == "orchestrator" and backend["port"]["name"] == "grpc"
    assert not by_kind(render(CI_VALUES[0]), "Ingress")


def test_notes_show_a_grpcurl_call(tmp_path):
    """NOTES.txt as `helm install` prints it: rendered in a copy of the chart, wrapped in a ConfigMap (helm template
    leaves NOTES out, and helm install wants a cluster)."""
    import shutil

    chart = shutil.copytree(CHART, tmp_path / "kinema")
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}' + notes + "{{- end -}}")
    (chart / "templates" / "notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  text: {{ include "notes" . | quote }}\n'
    )
    out = helm("template", RELEASE, str(chart), "-f", str(CI_VALUES[0]), "--show-only", "templates/notes.yaml").stdout
    text = yaml.safe_load(out)["data"]["text"]
    assert f"port-forward svc/{RELEASE}-kinema-orchestrator 50050:50051" in text
    assert "grpcurl -plaintext 127.0.0.1:50050 list" in text
    assert "kinema.orchestrator.v1.Orchestrator/Generate" in text


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("nope=1",), "Additional property nope is not allowed"),
        (("worker.pool=fork",), "worker.pool must be one of"),
        (("triton.modelRepository.source=http",), "triton.modelRepository.source must be one of"),
        (("services.text_encoder.env.PATH=/x",), "Does not match pattern"),
        (("services.Bad-Name.enabled=true",), "Does not match pattern"),
        (("triton.gpu.modelConfigName=g p u",), "Does not match pattern"),
        (("minio.enabled=false",), "artifacts.endpoint"),
        (("minio.enabled=false", "artifacts.endpoint=s3.example:443"), "artifacts.accessKey"),
        (("redis.enabled=false",), "redis.externalUrl"),
        (("orchestrator.maxInFlight=-1",), "orchestrator.maxInFlight: Must be greater than or equal to 0"),
        (("orchestrator.maxInFlight=lots",), "orchestrator.maxInFlight: Invalid type. Expected: integer"),
        (("services.denoiser.maxInFlight=-1",), "services.denoiser.maxInFlight: Must be greater than or equal to 0"),
        (("services.text_encoder.maxInFlight=8x",), "services.text_encoder.maxInFlight: Invalid type"),
        (("orchestrator.maxQueuedJobs=-5",), "orchestrator.maxQueuedJobs: Must be greater than or equal to 0"),
        (("orchestrator.maxQueuedJobs=many",), "orchestrator.maxQueuedJobs: Invalid type. Expected: integer"),
        (("maxPromptChars=0",), "maxPromptChars: Must be greater than or equal to 1"),
        (("maxPromptChars=-2000",), "maxPromptChars: Must be greater than or equal to 1"),
        (("maxPromptChars=long",), "maxPromptChars: Invalid type. Expected: integer"),
    ],
)
def test_values_the_chart_refuses(sets, message):
    assert message in render_error(sets=sets)


def test_schema_is_strict_everywhere():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
                assert set(node.get("required", [])) <= set(node["properties"]), path
            for k, v in node.items():
                walk(v, f"{path}.{k}")

    walk(schema, "$")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = (CHART / "values.yaml").read_text()
    for key in values:
        assert f"## @param {key}" in documented, f"values.yaml: {key} has no ## @param line"


DISTILLATION = ("distillation.enabled=true",)
DISTILL_WORKER_VARS = {"KINEMA_TRITON_URL", "KINEMA_MODELS", "KINEMA_DISTILL_DIR"}


def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def _volume_at(deployment: dict, path: str) -> tuple[dict, dict]:
    """(mount, volume) of the first container's volume mounted at `path`."""
    (c,) = containers(deployment)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == path)
    return mount, next(v for v in _pod(deployment)["volumes"] if v["name"] == mount["name"])


def test_distillation_is_off_by_default_and_the_distill_service_then_has_no_redis():
    """Without distillation.enabled nothing of it is rendered: the distill service's distillation RPCs answer
    UNIMPLEMENTED (no KINEMA_REDIS_URL) and the worker has no Triton, repository or scratch folder."""
    docs = render(CI_VALUES[0])
    distill = env_of(containers(_workload(docs, "distill"))[0])
    assert not {"KINEMA_REDIS_URL", "KINEMA_ARTIFACTS", "KINEMA_STUDENT_RESTORE_SECONDS"} & set(distill)
    worker = _workload(docs, "worker")
    assert not DISTILL_WORKER_VARS & set(env_of(containers(worker)[0]))
    assert "initContainers" not in _pod(worker)
    assert not [v for v in _pod(worker)["volumes"] if v["name"].startswith("distill-")]


@pytest.mark.parametrize("profile", ["cpu", "external-s3"])
def test_distillation_gives_the_distill_service_the_jobs_redis_and_the_worker_what_stack_up_gives_it(profile):
    """The distill service's KINEMA_REDIS_URL is the orchestrator's and the worker's (one Secret, one key); the
    worker's settings parse as kinema.orchestration reads them, with Triton's gRPC Service, the repository and the
    scratch folder each on a volume of its own (the root filesystem is read-only)."""
    from kinema.orchestration.settings import OrchestratorSettings

    docs = render(CHART / "ci" / f"{profile}-values.yaml", sets=DISTILLATION)
    services = by_kind(docs, "Service")
    distill = env_of(containers(_workload(docs, "distill"))[0])
    for comp in ("orchestrator", "worker"):
        caller = env_of(containers(_workload(docs, comp))[0])
        for var in ("KINEMA_REDIS_URL", "KINEMA_ARTIFACTS", ENV_ACCESS_KEY, ENV_SECRET_KEY):  # the same store and keys
            assert distill[var] == caller[var], var
    # It loads the students jobs stored back into a Triton that restarted without them.
    from kinema.orchestration.distillation import job_settings

    distill_jobs = job_settings(_with_secrets(docs, distill))
    assert distill_jobs.artifacts.startswith("s3://")
    assert distill_jobs.restore_seconds == 30
    if profile == "cpu":
        env = _with_secrets(docs, env_of(containers(_workload(docs, "distill"))[0]))
        assert component(services[env["KINEMA_REDIS_URL"].rsplit("@", 1)[1].split(":")[0]]) == "redis"
    worker = _workload(docs, "worker")
    env = _with_secrets(docs, env_of(containers(worker)[0]))
    env |= {ENV_ACCESS_KEY: "k", ENV_SECRET_KEY: "s", "KINEMA_REDIS_URL": "redis://redis.example:6380/0"}
    settings = OrchestratorSettings.from_env(environ=env)
    host, port = settings.service.triton_url.rsplit(":", 1)
    assert component(services[host]) == "triton"
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"] if p["name"] == "grpc"}
    mount, volume = _volume_at(worker, str(settings.service.models_dir))
    assert mount["readOnly"] is True and volume["emptyDir"]["sizeLimit"] == "2Gi"
    mount, volume = _volume_at(worker, str(settings.distill_path))
    assert not mount.get("readOnly") and volume["emptyDir"]["sizeLimit"] == "10Gi"


def test_the_worker_copies_the_repository_triton_serves_from_the_same_source():
    """No model repository in the worker image: an init container fills the workers' KINEMA_MODELS volume from the
    Triton image's folder (source=image) or from Triton's bucket and prefix, with Triton's own S3 keys (source=s3)."""
    docs = render(CI_VALUES[0], sets=DISTILLATION)
    worker = _workload(docs, "worker")
    models = env_of(containers(worker)[0])["KINEMA_MODELS"]["value"]
    (init,) = _pod(worker)["initContainers"]
    assert init["image"] == containers(_workload(docs, "triton"))[0]["image"]
    path = next(a for a in containers(_workload(docs, "triton"))[0]["args"] if a.startswith("--model-repository="))
    assert init["command"] == ["cp", "-R", path.split("=", 1)[1] + "/.", models + "/"]
    assert {"name": "distill-models", "mountPath": models} in init["volumeMounts"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True and init["resources"]["limits"]["memory"]

    docs = render(CHART / "ci" / "external-s3-values.yaml", sets=DISTILLATION)
    worker, triton = _workload(docs, "worker"), containers(_workload(docs, "triton"))[0]
    (init,) = _pod(worker)["initContainers"]
    assert init["image"] == containers(worker)[0]["image"]  # python and the minio client
    repository = next(a for a in triton["args"] if a.startswith("--model-repository="))
    assert init["command"] == ["python", "-m", "kinema.storage.model_repository", repository, models, "--secure", "1"]
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        assert env_of(init)[var] == env_of(triton)[var], var


def test_distillation_volumes_from_claims():
    """A claim holding the repository replaces the init container (mounted read-only, at its subPath); the scratch
    folder goes on the chart's PVC (kept on uninstall, as MinIO's and Redis') or on a claim of the platform's."""
    sets = (*DISTILLATION, "distillation.models.existingClaim=kinema-models", "distillation.models.subPath=v1",
            "distillation.scratch.persistence.enabled=true",
            "distillation.scratch.persistence.accessMode=ReadWriteMany")  # fmt: skip
    docs = render(CI_VALUES[0], sets=sets)
    worker = _workload(docs, "worker")
    env = env_of(containers(worker)[0])
    assert "initContainers" not in _pod(worker)
    mount, volume = _volume_at(worker, env["KINEMA_MODELS"]["value"])
    assert mount["readOnly"] is True and mount["subPath"] == "v1"
    assert volume["persistentVolumeClaim"] == {"claimName": "kinema-models", "readOnly": True}
    _, volume = _volume_at(worker, env["KINEMA_DISTILL_DIR"]["value"])
    claim = by_kind(docs, "PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert component(claim) == "worker" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    own = render(CI_VALUES[0], sets=(*sets, "distillation.scratch.persistence.existingClaim=scratch"))
    _, volume = _volume_at(_workload(own, "worker"), env["KINEMA_DISTILL_DIR"]["value"])
    assert volume["persistentVolumeClaim"] == {"claimName": "scratch"}
    assert set(by_kind(own, "PersistentVolumeClaim")) == set(by_kind(render(CI_VALUES[0]), "PersistentVolumeClaim"))


def test_triton_accepts_the_students_load():
    """The worker loads a student with Triton's model-load API, which Triton accepts under explicit model control;
    the models it starts with are the --load-model ones, and it stays ready on those alone."""
    (t,) = containers(_workload(render(CI_VALUES[0], sets=DISTILLATION), "triton"))
    assert "--model-control-mode=explicit" in t["args"]
    assert not [a for a in t["args"] if a.startswith("--model-control-mode=") and a != "--model-control-mode=explicit"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("jobs.enabled=false",), "distillation.enabled needs jobs.enabled"),
        (("services.distill.enabled=false",), "distillation.enabled needs services.distill.enabled"),
        (("triton.replicaCount=2",), "distillation.enabled needs one Triton pod"),
        (("triton.autoscaling.enabled=true",), "distillation.enabled needs one Triton pod"),
        (("internalTls.existingSecret=internal",), "needs internalTls.triton=true"),
        (("distillation.scratch.persistence.accessMode=Many",), "accessMode must be one of"),
        (("distillation.models.sizeLimit=lots",), "Does not match pattern"),
        (("distillation.models.existingClaim=Bad_Claim",), "Does not match pattern"),
    ],
)
def test_distillation_values_the_chart_refuses(sets, message):
    assert message in render_error(sets=DISTILLATION + sets)


FITTING = ("fitting.enabled=true",)


def test_fitting_gives_the_interpret_service_the_jobs_redis_and_store_and_the_workers_the_repository():
    """fitting.enabled alone: the interpret service records fittings in the orchestrator's Redis and loads stored
    models back from its store (KINEMA_MODEL_RESTORE_SECONDS); the workers get the repository, Triton and the
    scratch folder as for distillations; the distill service gets nothing."""
    from kinema.orchestration.fitting import job_settings

    docs = render(CI_VALUES[0], sets=FITTING)
    interpret = env_of(containers(_workload(docs, "interpret"))[0])
    orchestrator = env_of(containers(_workload(docs, "orchestrator"))[0])
    for var in ("KINEMA_REDIS_URL", "KINEMA_ARTIFACTS", ENV_ACCESS_KEY, ENV_SECRET_KEY):
        assert interpret[var] == orchestrator[var], var
    fit_jobs = job_settings(_with_secrets(docs, interpret))
    assert fit_jobs.redis_url.startswith("redis://") and fit_jobs.artifacts.startswith("s3://")
    assert fit_jobs.restore_seconds == 30
    distill = env_of(containers(_workload(docs, "distill"))[0])
    assert not {"KINEMA_REDIS_URL", "KINEMA_STUDENT_RESTORE_SECONDS"} & set(distill)
    worker = _workload(docs, "worker")
    assert set(env_of(containers(worker)[0])) >= DISTILL_WORKER_VARS
    assert [c["name"] for c in _pod(worker)["initContainers"]] == ["models"]
    off = env_of(containers(_workload(render(CI_VALUES[0]), "interpret"))[0])
    assert not {"KINEMA_REDIS_URL", "KINEMA_ARTIFACTS", "KINEMA_MODEL_RESTORE_SECONDS"} & set(off)
    both = render(CI_VALUES[0], sets=FITTING + DISTILLATION + ("fitting.restoreSeconds=5",))
    assert env_of(containers(_workload(both, "interpret"))[0])["KINEMA_MODEL_RESTORE_SECONDS"]["value"] == "5"
    assert [c["name"] for c in _pod(_workload(both, "worker"))["initContainers"]] == ["models"]  # one copy for both


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("jobs.enabled=false",), "fitting.enabled needs jobs.enabled"),
        (("services.interpret.enabled=false",), "fitting.enabled needs services.interpret.enabled"),
        (("triton.replicaCount=2",), "fitting.enabled needs one Triton pod"),
        (("internalTls.existingSecret=internal",), "needs internalTls.triton=true"),
        (("fitting.restoreSeconds=-1",), "fitting.restoreSeconds"),
    ],
)
def test_fitting_values_the_chart_refuses(sets, message):
    assert message in render_error(sets=FITTING + sets)


def test_distillation_validates_against_kubernetes():
    sets = (*DISTILLATION, *FITTING, "distillation.scratch.persistence.enabled=true")
    for values, extra in ((CI_VALUES[0], sets), (CHART / "ci" / "external-s3-values.yaml", DISTILLATION),
                          (CHART / "ci" / "tls-values.yaml", DISTILLATION + FITTING),
                          (CI_VALUES[0], FITTING)):  # fmt: skip
        docs = render(values, sets=extra)
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, KUBERNETES[-1], strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}") from None
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), *[a for s in sets for a in ("--set", s)]).stdout
