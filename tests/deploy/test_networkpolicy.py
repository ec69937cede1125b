"""The NetworkPolicies allow exactly the calls Kinema makes, derived from the addresses in each process's settings."""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qs, urlsplit

import pytest

from .conftest import CHART, CI_VALUES, by_kind, component, containers, render

PROFILES = [p for p in CI_VALUES if "minimal" not in p.name]  # minimal turns the policies off


def _resolve(docs: list[dict], entry: dict) -> str | None:
    if "value" in entry:
        return entry["value"]
    ref = entry["valueFrom"]["secretKeyRef"]
    secret = by_kind(docs, "Secret").get(ref["name"])
    return base64.b64decode(secret["data"][ref["key"]]).decode() if secret else None


def _addresses(value: str) -> list[str]:
    """host:port pairs a setting names: plain host:port, redis://..., s3://bucket?endpoint=..., Triton's s3://host:port/."""
    if re.fullmatch(r"[a-z0-9.-]+:\d+", value):
        return [value]
    parts = urlsplit(value)
    if parts.scheme in ("redis", "rediss"):
        return [f"{parts.hostname}:{parts.port or 6379}"]
    if parts.scheme == "s3":
        endpoint = parse_qs(parts.query).get("endpoint")
        return endpoint or [parts.netloc]
    return []


def expected_edges(docs: list[dict]) -> set[tuple[str, str, int]]:
    """(caller, callee, port) for every address of a release Service in a container's env or arguments."""
    services = by_kind(docs, "Service")
    edges = set()
    for d in by_kind(docs, "Deployment").values():
        for c in containers(d) + d["spec"]["template"]["spec"].get("initContainers", []):
            values = [_resolve(docs, e) for e in c.get("env", [])]
            values += [a.split("=", 1)[1] for a in c.get("args", []) if a.startswith("--model-repository=")]
            for value in filter(None, values):
                for address in _addresses(value):
                    host, _, port = address.rpartition(":")
                    if host in services:
                        edges.add((component(d), component(services[host]), int(port)))
    return edges


def _peers(rule: dict, key: str, release: str) -> list[str | None]:
    """The release components a rule's peers select; None for a peer outside the release (namespaces, CIDRs)."""
    out = []
    for peer in rule.get(key, [{}]):
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        if "namespaceSelector" in peer or "ipBlock" in peer or not labels:
            out.append(None)
        else:
            assert labels.get("app.kubernetes.io/instance") == release, peer
            out.append(labels["app.kubernetes.io/component"])
    return out


def allowed_edges(docs: list[dict]) -> tuple[set, set]:
    """(edges both ends' policies allow inside the release, (component, port) open to peers outside it)."""
    egress, ingress, outside = set(), set(), set()
    for p in by_kind(docs, "NetworkPolicy").values():
        selected = p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
        if selected is None:
            continue  # the release-wide default deny and DNS
        for rule in p["spec"].get("egress", []):
            for peer in _peers(rule, "to", "kin"):
                for port in rule["ports"]:
                    if peer is not None:
                        egress.add((selected, peer, port["port"]))
        for rule in p["spec"].get("ingress", []):
            for peer in _peers(rule, "from", "kin"):
                for port in rule["ports"]:
                    (ingress if peer is not None else outside).add(
                        (peer, selected, port["port"]) if peer is not None else (selected, port["port"])
                    )
    return egress & ingress, outside, egress ^ ingress


@pytest.mark.parametrize("values", PROFILES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def test_policies_allow_exactly_the_real_paths(values):
    docs = render(values)
    allowed, _, one_sided = allowed_edges(docs)
    expected = expected_edges(docs)
    assert expected, "no calls found in the settings"
    assert allowed == expected, f"missing: {sorted(expected - allowed)}; extra: {sorted(allowed - expected)}"
    assert not one_sided, f"allowed at one end only: {sorted(one_sided)}"


def test_the_real_paths_are_the_platform_architecture():
    edges = expected_edges(render(CI_VALUES[0]))
    callers = {"orchestrator", "worker"}
    # What the orchestrator and worker call (distill: the few-step students; depth: edit_video's structure);
    # interpret: its own clients only.
    models = {"text-encoder", "autoencoder", "denoiser", "distill", "depth"}
    assert edges == ({(c, m, 50051) for c in callers for m in models} | {(m, "triton", 8001) for m in models}
                     | {("interpret", "triton", 8001)}
                     | {(c, "minio", 9000) for c in callers} | {(c, "redis", 6379) for c in callers})  # fmt: skip


def test_only_the_api_and_metrics_are_open_to_outside_and_everything_else_is_denied():
    docs = render(CI_VALUES[0])
    _, outside, _ = allowed_edges(docs)
    assert outside == {("orchestrator", 50051), ("orchestrator", 9100), ("text-encoder", 9100),
                       ("autoencoder", 9100), ("denoiser", 9100), ("distill", 9100), ("depth", 50051), ("depth", 9100),
                       ("interpret", 50051), ("interpret", 9100), ("worker", 9100), ("triton", 8002)}  # fmt: skip
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["kin-kinema-default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    release = {"app.kubernetes.io/name": "kinema", "app.kubernetes.io/instance": "kin"}
    assert deny["podSelector"]["matchLabels"] == release
    dns = policies["kin-kinema-dns"]["spec"]["egress"]
    assert [p["port"] for p in dns[0]["ports"]] == [53, 53]
    for d in by_kind(docs, "Deployment").values():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert deny["podSelector"]["matchLabels"].items() <= labels.items()


def test_external_s3_and_redis_are_reached_on_their_ports_only():
    docs = render(CHART / "ci" / "external-s3-values.yaml")
    orchestrator = by_kind(docs, "NetworkPolicy")["kin-kinema-orchestrator"]["spec"]["egress"]
    external = {(r["to"][0]["ipBlock"]["cidr"], r["ports"][0]["port"]) for r in orchestrator if "ipBlock" in r["to"][0]}
    assert external == {("10.0.0.0/8", 443), ("10.0.0.0/8", 6380)}
    triton = by_kind(docs, "NetworkPolicy")["kin-kinema-triton"]["spec"]["egress"]
    assert [r["ports"][0]["port"] for r in triton] == [443], "Triton reads its model repository from S3"


def test_services_with_clients_of_their_own_are_open_to_the_api_peers():
    """depth and interpret answer clients of their own: their APIs are open to networkPolicy.apiFrom, as the
    orchestrator's is. interpret is not called by the orchestrator; depth is (edit_video), by a rule of its own."""
    policies = by_kind(render(CHART / "ci" / "gpu-values.yaml"), "NetworkPolicy")

    def api_rules(name: str) -> list[dict]:
        return [r for r in policies[f"kin-kinema-{name}"]["spec"]["ingress"] if r["ports"][0]["port"] == 50051]

    def called_by(caller: str) -> set[str]:
        peers = [p for r in policies[f"kin-kinema-{caller}"]["spec"]["egress"] for p in r["to"]]
        return {p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") for p in peers}

    (orchestrator_api,) = api_rules("orchestrator")
    for name in ("depth", "interpret"):
        outside = [r for r in api_rules(name) if "podSelector" not in r["from"][0]]
        assert [r["from"] for r in outside] == [orchestrator_api["from"]]
        assert orchestrator_api["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                                                    "ingress-nginx"}}}]  # fmt: skip
    (callers,) = [r for r in api_rules("depth") if "podSelector" in r["from"][0]]
    assert sorted(_peers(callers, "from", "kin")) == ["orchestrator", "worker"]
    assert len(api_rules("interpret")) == 1
    for caller in ("orchestrator", "worker"):  # let out to depth, not to interpret
        assert "depth" in called_by(caller) and "interpret" not in called_by(caller)


def test_the_distill_service_is_called_by_the_orchestrator_and_worker_only():
    """distill is orchestrated (KINEMA_DISTILL_URL): its API takes the callers, not networkPolicy.apiFrom; without it
    (services.distill.enabled=false) no policy names it and the callers are not let out to it."""
    docs = render(CHART / "ci" / "gpu-values.yaml")
    policies = by_kind(docs, "NetworkPolicy")
    (api,) = [r for r in policies["kin-kinema-distill"]["spec"]["ingress"] if r["ports"][0]["port"] == 50051]
    assert sorted(_peers(api, "from", "kin")) == ["orchestrator", "worker"]
    edges, _, _ = allowed_edges(docs)
    assert {e for e in edges if "distill" in e[:2]} == {
        ("orchestrator", "distill", 50051),
        ("worker", "distill", 50051),
        ("distill", "triton", 8001),
    }
    without = render(CHART / "ci" / "gpu-values.yaml", sets=("services.distill.enabled=false",))
    assert "kin-kinema-distill" not in by_kind(without, "NetworkPolicy")
    edges, _, one_sided = allowed_edges(without)
    assert not [e for e in edges if "distill" in e[:2]] and not one_sided


DISTILLATION = ("distillation.enabled=true",)


@pytest.mark.parametrize("values", PROFILES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def test_policies_allow_exactly_the_real_paths_with_distillation(values):
    # gpu runs two autoscaled Triton pods, which the chart refuses with distillation (one pod holds a student)
    one_triton = ("triton.autoscaling.enabled=false", "triton.replicaCount=1") if "gpu" in values.name else ()
    docs = render(values, sets=DISTILLATION + one_triton)
    allowed, _, one_sided = allowed_edges(docs)
    expected = expected_edges(docs)
    assert allowed == expected, f"missing: {sorted(expected - allowed)}; extra: {sorted(allowed - expected)}"
    assert not one_sided, f"allowed at one end only: {sorted(one_sided)}"


@pytest.mark.parametrize("source", ["image", "s3"])
def test_distillation_adds_worker_to_triton_and_distill_to_redis_and_s3_and_nothing_else(source):
    """The worker loads students into Triton (KINEMA_TRITON_URL), the distill service records distillation jobs in
    Redis (KINEMA_REDIS_URL) and loads stored students back from S3 (KINEMA_ARTIFACTS): three paths more, and none
    when distillation is off. With the repository in S3 the worker's init container reads it through the S3 path the
    worker already has."""
    sets = (f"triton.modelRepository.source={source}",)
    before, _, _ = allowed_edges(render(CI_VALUES[0], sets=sets))
    docs = render(CI_VALUES[0], sets=sets + DISTILLATION)
    after, outside, _ = allowed_edges(docs)
    assert after - before == {("worker", "triton", 8001), ("distill", "redis", 6379), ("distill", "minio", 9000)}
    assert before <= after and after == expected_edges(docs)
    assert outside == allowed_edges(render(CI_VALUES[0], sets=sets))[1], "nothing more is open to outside"
    if source == "s3":
        assert ("worker", "minio", 9000) in after and ("triton", "minio", 9000) in after


def test_fitting_adds_worker_to_triton_and_interpret_to_redis_and_s3_and_nothing_else():
    """The worker loads fitted models into Triton, the interpret service records fittings in Redis and loads stored
    models back from S3: three paths more; with distillation too, the worker's path to Triton is the one both use."""
    before, outside_before, _ = allowed_edges(render(CI_VALUES[0]))
    docs = render(CI_VALUES[0], sets=("fitting.enabled=true",))
    after, outside, one_sided = allowed_edges(docs)
    assert after - before == {("worker", "triton", 8001), ("interpret", "redis", 6379), ("interpret", "minio", 9000)}
    assert before <= after and after == expected_edges(docs) and not one_sided
    assert outside == outside_before, "nothing more is open to outside"
    both = render(CI_VALUES[0], sets=("fitting.enabled=true", *DISTILLATION))
    edges, _, one_sided = allowed_edges(both)
    assert edges == expected_edges(both) and not one_sided
    assert edges - before == {("worker", "triton", 8001), ("interpret", "redis", 6379), ("interpret", "minio", 9000),
                              ("distill", "redis", 6379), ("distill", "minio", 9000)}  # fmt: skip


def test_an_external_redis_and_s3_are_reached_by_the_distill_service_on_their_ports_only():
    docs = render(CHART / "ci" / "external-s3-values.yaml", sets=DISTILLATION)
    egress = by_kind(docs, "NetworkPolicy")["kin-kinema-distill"]["spec"]["egress"]
    external = {(p["ipBlock"]["cidr"], port["port"]) for r in egress for p in r["to"] if "ipBlock" in p
                for port in r["ports"]}  # fmt: skip
    cidrs = ("10.0.0.0/8", "52.219.0.0/16")
    assert external == {(c, 6380) for c in cidrs} | {(c, 443) for c in cidrs}  # Redis; S3 over TLS
