"""The public gRPC contracts: generated modules are current, and every service keeps the house conventions."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor

from kinema.rpc.protos import SUFFIXES, describe, generate

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
SHARED = REPO / "shared"
SERVICES = {
    "text_encoder": "TextEncoder",
    "autoencoder": "Autoencoder",
    "denoiser": "Denoiser",
    "depth": "Depth",
    "distill": "Distill",
    "interpret": "Interpret",
}
STREAMING = {("denoiser", "Sample"), ("distill", "Sample")}


def test_checked_in_modules_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = {f.relative_to(tmp_path) for f in generate(tmp_path, PROTOS)}
    stale = [
        str(rel)
        for rel in sorted(fresh)
        if not (SHARED / rel).is_file() or (SHARED / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    orphans = [
        str(path.relative_to(SHARED))
        for path in sorted((SHARED / "kinema").rglob("*_pb2*"))
        if path.name.endswith(SUFFIXES) and path.relative_to(SHARED) not in fresh
    ]
    assert not stale, f"generated modules are stale or missing, run make protos: {stale}"
    assert not orphans, f"generated modules without a .proto, delete them and run make protos: {orphans}"
    packages = {rel.parent for rel in fresh} | {rel.parent.parent for rel in fresh}
    missing = [str(p) for p in sorted(packages) if p != Path("kinema") and not (SHARED / p / "__init__.py").is_file()]
    assert not missing, f"generated packages lack __init__.py, run make protos: {missing}"


@pytest.fixture(scope="module")
def documented(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    return describe(PROTOS, tmp_path_factory.mktemp("descriptors") / "kinema.binpb")


def _undocumented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Names of the messages, fields, oneofs, enums, values, services and RPCs with no leading comment."""
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
    missing: list[str] = []

    def check(path: tuple[int, ...], name: str) -> None:
        if not comments.get(path):
            missing.append(name)

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], scope: str) -> None:
        check(path, f"{scope}{e.name}")
        for i, v in enumerate(e.value):
            check((*path, 2, i), f"{scope}{e.name}.{v.name}")

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], scope: str) -> None:
        name = f"{scope}{m.name}"
        check(path, name)
        for i, f in enumerate(m.field):
            check((*path, 2, i), f"{name}.{f.name}")
        for i, o in enumerate(m.oneof_decl):
            check((*path, 8, i), f"{name}.{o.name}")
        for i, nested in enumerate(m.nested_type):
            if not nested.options.map_entry:  # synthesised for a map<> field, documented there
                message(nested, (*path, 3, i), f"{name}.")
        for i, e in enumerate(m.enum_type):
            enum(e, (*path, 4, i), f"{name}.")

    for i, m in enumerate(file.message_type):
        message(m, (4, i), "")
    for i, e in enumerate(file.enum_type):
        enum(e, (5, i), "")
    for i, s in enumerate(file.service):
        check((6, i), s.name)
        for j, rpc in enumerate(s.method):
            check((6, i, 2, j), f"{s.name}.{rpc.name}")
    return missing


def test_every_element_of_every_proto_is_documented(documented: descriptor_pb2.FileDescriptorSet) -> None:
    expected = {"kinema/common/v1/common.proto"} | {f"kinema/{s}/v1/{s}.proto" for s in SERVICES}
    assert expected <= {f.name for f in documented.file}
    missing = {f.name: _undocumented(f) for f in documented.file}
    assert not any(missing.values()), f"elements without a leading comment: { {k: v for k, v in missing.items() if v} }"


def _service(svc: str):
    module = importlib.import_module(f"kinema.{svc}.v1.{svc}_pb2")
    assert module.DESCRIPTOR.package == f"kinema.{svc}.v1"
    assert module.DESCRIPTOR.name == f"kinema/{svc}/v1/{svc}.proto"
    assert list(module.DESCRIPTOR.services_by_name) == [SERVICES[svc]], "one service per proto"
    return module.DESCRIPTOR.services_by_name[SERVICES[svc]]


def _model_info_field(message, depth: int = 1) -> FieldDescriptor | None:
    """The `ModelInfo model` field of `message`, or of a message it holds (e.g. a streamed result)."""
    for field in message.fields:
        if field.message_type is None:
            continue
        if field.name == "model" and field.message_type.full_name == "kinema.common.v1.ModelInfo":
            return field
        if depth > 0 and not field.message_type.full_name.startswith("kinema.common."):
            found = _model_info_field(field.message_type, depth - 1)
            if found is not None:
                return found
    return None


@pytest.mark.parametrize("svc", SERVICES)
def test_every_service_lists_its_models(svc: str) -> None:
    rpc: MethodDescriptor = _service(svc).methods_by_name["ListModels"]
    assert rpc.input_type.name == "ListModelsRequest"
    assert rpc.output_type.name == "ListModelsResponse"
    models = rpc.output_type.fields_by_name["models"]
    assert models.message_type.full_name == "kinema.common.v1.ModelInfo"
    assert models.is_repeated
    assert rpc.output_type.fields_by_name["default_model"].type == FieldDescriptor.TYPE_STRING


@pytest.mark.parametrize("svc", SERVICES)
def test_every_request_selects_a_model_and_every_response_echoes_it(svc: str) -> None:
    for rpc in _service(svc).methods:
        assert rpc.input_type.name == f"{rpc.name}Request" and rpc.output_type.name == f"{rpc.name}Response"
        model = rpc.input_type.fields_by_name.get("model")
        assert model is not None, f"{rpc.full_name}: request has no model field"
        assert (model.number, model.message_type.full_name) == (1, "kinema.common.v1.ModelRef"), rpc.full_name
        if rpc.name != "ListModels":
            assert _model_info_field(rpc.output_type) is not None, f"{rpc.full_name}: response lacks ModelInfo model"


@pytest.mark.parametrize("svc", SERVICES)
def test_only_sampling_streams(svc: str) -> None:
    for rpc in _service(svc).methods:
        assert not rpc.client_streaming, rpc.full_name
        assert rpc.server_streaming == ((svc, rpc.name) in STREAMING), rpc.full_name


def test_a_sample_stream_ends_in_a_result_with_latents() -> None:
    from kinema.common.v1 import common_pb2
    from kinema.denoiser.v1 import denoiser_pb2

    event = denoiser_pb2.SampleResponse(progress=common_pb2.Progress(step=1, total=4))
    assert event.WhichOneof("event") == "progress"
    event.result.latents.shape.extend([1, 4, 8, 8])
    assert event.WhichOneof("event") == "result"  # setting the result clears the progress: one event per message
    wire = denoiser_pb2.SampleResponse.FromString(event.SerializeToString())
    assert list(wire.result.latents.shape) == [1, 4, 8, 8]
