"""What a client or an operator sees before running anything: health, reflection, models, pipelines, metrics."""

from __future__ import annotations

import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kinema.orchestrator.v1 import orchestrator_pb2 as pb

SERVICE = "kinema.orchestrator.v1.Orchestrator"


def test_health_says_serving_for_the_server_and_the_service(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == 1
    try:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        raise AssertionError("an unknown service must not be reported healthy")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(channel) -> None:
    """grpcurl works without the .proto files: the server lists its services and serves their descriptors."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]  # fmt: skip
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the serialized .proto and its imports


def test_every_capability_lists_its_models(kinema) -> None:
    capabilities = {c.capability: c for c in kinema.call("ListModels", pb.ListModelsRequest()).capabilities}
    for name in ("text_encoder", "autoencoder", "denoiser"):
        c = capabilities[name]
        assert c.available, f"{name} service did not answer"
        # A model is listed as itself, or (the autoencoder's `vae`) as its networks `vae_encoder`, `vae_decoder`.
        assert {m.name for m in c.models} & {c.default_model, f"{c.default_model}_encoder"}, c
        assert all(m.version and m.sha256 for m in c.models), c.models


def test_pipelines_describe_themselves(kinema) -> None:
    pipelines = {p.name: p for p in kinema.call("ListPipelines", pb.ListPipelinesRequest()).pipelines}
    assert {"text_to_image", "image_to_image", "inpaint"} <= set(pipelines)
    t2i = pipelines["text_to_image"]
    assert t2i.output_media_type == "image/png" and "prompts" in {p.name for p in t2i.parameters}
    i2i = pipelines["image_to_image"]
    assert [(i.name, i.required) for i in i2i.inputs if i.name == "image"] == [("image", True)]
    assert "strength" in {p.name for p in i2i.parameters}
    assert {"image", "mask"} <= {i.name for i in pipelines["inpaint"].inputs}


def families(url: str) -> dict[str, str]:
    """The metric families an endpoint exposes, with their types (from the `# TYPE` lines)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))


RPC_FAMILIES = {"kinema_rpc_requests_total": "counter", "kinema_rpc_request_seconds": "histogram",
                "kinema_rpc_in_flight_requests": "gauge"}  # fmt: skip
# The job worker serves no RPCs, only its job runs (kinema.jobs.metrics).
WORKER_FAMILIES = {"kinema_worker_jobs_started_total": "counter", "kinema_worker_jobs_finished_total": "counter",
                   "kinema_worker_job_seconds": "histogram", "kinema_worker_jobs_in_progress": "gauge"}  # fmt: skip


def test_metrics_endpoints_serve_the_documented_families(kinema, metrics_urls) -> None:
    kinema.generate(prompts=["a red cube"], steps=2)  # every service answers at least one call
    for name, url in metrics_urls.items():
        found = families(url)
        if name == "worker":
            assert WORKER_FAMILIES.items() <= found.items(), (name, found)
            continue
        assert RPC_FAMILIES.items() <= found.items(), (name, found)
        if name != "orchestrator":  # the model services time their network calls
            assert found.get("kinema_model_seconds") == "histogram", (name, found)
    text = urllib.request.urlopen(metrics_urls["orchestrator"], timeout=10).read().decode()
    ok = [line for line in text.splitlines() if line.startswith("kinema_rpc_requests_total{")
          and 'method="Generate"' in line and 'code="OK"' in line]  # fmt: skip
    assert ok and float(ok[0].split()[-1]) >= 1, text[:2000]
