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
# The model services: each request selects one model and each response echoes the one that ran.
SERVICES = {
    "text_encoder": "TextEncoder",
    "autoencoder": "Autoencoder",
    "denoiser": "Denoiser",
    "depth": "Depth",
    "distill": "Distill",
    "interpret": "Interpret",
}
STREAMING = {("denoiser", "Sample"), ("denoiser", "SampleVideo"), ("distill", "Sample")}
# The public front door composes pipelines over several models, so it has its own rules (below).
ORCHESTRATOR = {"orchestrator": "Orchestrator"}
ALL_SERVICES = SERVICES | ORCHESTRATOR
# RPC -> (client streaming, server streaming); every other shape is a contract change.
ORCHESTRATOR_RPCS = {
    "Generate": (False, True),
    "SubmitJob": (False, False),
    "GetJob": (False, False),
    "WatchJob": (False, True),
    "CancelJob": (False, False),
    "ListJobs": (False, False),
    "UploadArtifact": (True, False),
    "GetArtifact": (False, False),
    "ListModels": (False, False),
    "ListPipelines": (False, False),
}


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
        synthetic = {f.oneof_index for f in m.field if f.proto3_optional}  # from `optional`, documented at the field
        for i, o in enumerate(m.oneof_decl):
            if i not in synthetic:
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
    expected = {"kinema/common/v1/common.proto"} | {f"kinema/{s}/v1/{s}.proto" for s in ALL_SERVICES}
    assert expected <= {f.name for f in documented.file}
    missing = {f.name: _undocumented(f) for f in documented.file}
    assert not any(missing.values()), f"elements without a leading comment: { {k: v for k, v in missing.items() if v} }"


def _service(svc: str):
    module = importlib.import_module(f"kinema.{svc}.v1.{svc}_pb2")
    assert module.DESCRIPTOR.package == f"kinema.{svc}.v1"
    assert module.DESCRIPTOR.name == f"kinema/{svc}/v1/{svc}.proto"
    assert list(module.DESCRIPTOR.services_by_name) == [ALL_SERVICES[svc]], "one service per proto"
    return module.DESCRIPTOR.services_by_name[ALL_SERVICES[svc]]


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


@pytest.mark.parametrize("svc", ALL_SERVICES)
def test_every_rpc_has_its_own_request_and_response(svc: str) -> None:
    for rpc in _service(svc).methods:
        assert rpc.input_type.name == f"{rpc.name}Request" and rpc.output_type.name == f"{rpc.name}Response"
        assert rpc.input_type.file is rpc.output_type.file is rpc.containing_service.file, rpc.full_name


# Job RPCs of a model service (the distill service's distillations, the interpret service's fittings): a start names
# its input model by its role (`teacher`: a ModelRef, field 1; `representation`: which autoencoder's code, by name),
# reads and cancels name the job by `id` (field 1); the job they answer names its models by role, as ModelInfo.
_DISTILLATION = ("distillation", ("teacher", "student"))
_FITTING = ("fitting", ("representation", "model"))
JOB_RPCS = {("distill", "StartDistillation"): ("teacher", *_DISTILLATION),
            ("distill", "GetDistillation"): ("id", *_DISTILLATION),
            ("distill", "CancelDistillation"): ("id", *_DISTILLATION),
            ("interpret", "Fit"): ("representation", *_FITTING),
            ("interpret", "GetFitting"): ("id", *_FITTING),
            ("interpret", "CancelFitting"): ("id", *_FITTING)}  # fmt: skip


@pytest.mark.parametrize("svc", SERVICES)
def test_every_request_selects_a_model_and_every_response_echoes_it(svc: str) -> None:
    for rpc in _service(svc).methods:
        if (svc, rpc.name) in JOB_RPCS:
            name, job_field, roles = JOB_RPCS[svc, rpc.name]
            field = rpc.input_type.fields_by_name[name]
            kind = field.message_type.full_name if field.message_type else field.type
            assert (field.number, kind) in ((1, "kinema.common.v1.ModelRef"), (1, FieldDescriptor.TYPE_STRING),
                                            (2, FieldDescriptor.TYPE_STRING)), rpc.full_name  # fmt: skip
            job = rpc.output_type.fields_by_name[job_field].message_type
            for role in roles:
                assert job.fields_by_name[role].message_type.full_name == "kinema.common.v1.ModelInfo", rpc.full_name
            continue
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


# -- the orchestrator: the public front door ------------------------------------------------------


def test_the_orchestrator_offers_exactly_its_rpcs_in_their_stream_shapes() -> None:
    shapes = {rpc.name: (rpc.client_streaming, rpc.server_streaming) for rpc in _service("orchestrator").methods}
    assert shapes == ORCHESTRATOR_RPCS


def test_the_orchestrator_contract_uses_only_common_and_well_known_types() -> None:
    # Clients of the front door must not depend on the model services' internal messages.
    from kinema.orchestrator.v1 import orchestrator_pb2

    imported = {f.name for f in orchestrator_pb2.DESCRIPTOR.dependencies}
    assert imported == {
        "kinema/common/v1/common.proto",
        "google/protobuf/struct.proto",
        "google/protobuf/timestamp.proto",
    }


def _reachable(message, seen: dict[str, object] | None = None) -> dict[str, object]:
    """Every message type `message` holds, directly or nested, by full name (itself included)."""
    seen = {} if seen is None else seen
    if message.full_name not in seen:
        seen[message.full_name] = message
        for field in message.fields:
            if field.message_type is not None:
                _reachable(field.message_type, seen)
    return seen


def test_no_orchestrator_request_can_name_a_tenant() -> None:
    # The tenant comes from the call's credentials; a request field would let a caller pick another tenant.
    for rpc in _service("orchestrator").methods:
        for name, message in _reachable(rpc.input_type).items():
            assert "tenant" not in message.fields_by_name, f"{rpc.full_name}: {name} has a tenant field"


def test_job_states_start_unspecified_and_are_prefixed() -> None:
    from kinema.orchestrator.v1 import orchestrator_pb2

    states = {v.name: v.number for v in orchestrator_pb2.JobState.DESCRIPTOR.values}
    assert states == {
        "JOB_STATE_UNSPECIFIED": 0,
        "JOB_STATE_QUEUED": 1,
        "JOB_STATE_RUNNING": 2,
        "JOB_STATE_COMPLETED": 3,
        "JOB_STATE_FAILED": 4,
        "JOB_STATE_CANCELLED": 5,
    }


@pytest.mark.parametrize("rpc_name", ["GetJob", "WatchJob", "CancelJob"])
def test_job_rpcs_take_an_id_and_answer_with_the_job(rpc_name: str) -> None:
    rpc = _service("orchestrator").methods_by_name[rpc_name]
    job_id = rpc.input_type.fields_by_name["id"]
    assert (job_id.number, job_id.type) == (1, FieldDescriptor.TYPE_STRING)
    job = rpc.output_type.fields_by_name["job"]
    assert (job.number, job.message_type.full_name) == (1, "kinema.orchestrator.v1.Job")


def test_submit_job_is_idempotent_by_key_and_list_jobs_is_paged() -> None:
    service = _service("orchestrator")
    submit = service.methods_by_name["SubmitJob"]
    assert submit.input_type.fields_by_name["idempotency_key"].type == FieldDescriptor.TYPE_STRING
    assert submit.output_type.fields_by_name["job"].message_type.name == "Job"
    page = service.methods_by_name["ListJobs"]
    assert page.input_type.fields_by_name["page_size"].type == FieldDescriptor.TYPE_INT32
    assert page.input_type.fields_by_name["page_token"].type == FieldDescriptor.TYPE_STRING
    assert page.input_type.fields_by_name["state"].enum_type.name == "JobState"
    assert page.output_type.fields_by_name["next_page_token"].type == FieldDescriptor.TYPE_STRING
    assert page.output_type.fields_by_name["jobs"].is_repeated


@pytest.mark.parametrize("field, zero", [("guidance", 0.0), ("seed", 0)])
def test_guidance_and_seed_tell_zero_from_unset(field: str, zero: float) -> None:
    # guidance 0 (unconditional) and seed 0 are real values, not "use the default".
    from kinema.orchestrator.v1 import orchestrator_pb2

    assert not orchestrator_pb2.PipelineRequest().HasField(field)
    request = orchestrator_pb2.PipelineRequest(pipeline="text_to_image", **{field: zero})
    wire = orchestrator_pb2.PipelineRequest.FromString(request.SerializeToString())
    assert wire.HasField(field) and getattr(wire, field) == zero


def test_pipelines_are_open_ended_by_name_inputs_options_and_models() -> None:
    # Later pipelines (video, distilled, interpretation) register without a contract change.
    from kinema.orchestrator.v1 import orchestrator_pb2

    fields = orchestrator_pb2.PipelineRequest.DESCRIPTOR.fields_by_name
    assert fields["pipeline"].type == FieldDescriptor.TYPE_STRING
    assert fields["options"].message_type.full_name == "google.protobuf.Struct"
    for name, value in [("inputs", "kinema.common.v1.ArtifactRef"), ("models", "kinema.common.v1.ModelRef")]:
        assert fields[name].message_type.GetOptions().map_entry, name
        assert fields[name].message_type.fields_by_name["value"].message_type.full_name == value


def test_provenance_parameters_parse_back_into_the_request_that_made_the_artifact() -> None:
    from google.protobuf import json_format

    from kinema.common.v1 import common_pb2
    from kinema.orchestrator.v1 import orchestrator_pb2

    request = orchestrator_pb2.PipelineRequest(
        pipeline="inpaint",
        prompts=["a red cube"],
        seed=2**63 - 1,  # beyond a double's exact range: must survive as JSON's uint64 string
        steps=28,
        guidance=0.0,
        width=64,
        height=64,
        sampler="euler",
        shift=1.0,
        strength=1.0,
        inputs={"image": common_pb2.ArtifactRef(sha256="a" * 64), "mask": common_pb2.ArtifactRef(sha256="b" * 64)},
        models={"denoiser": common_pb2.ModelRef(name="mini", version="1")},
    )
    request.options.update({"frames": 16})
    provenance = orchestrator_pb2.Provenance(pipeline=request.pipeline, seed=request.seed)
    provenance.parameters.update(json_format.MessageToDict(request, preserving_proto_field_name=True))
    provenance.parent_sha256.extend(ref.sha256 for ref in request.inputs.values())
    wire = orchestrator_pb2.Provenance.FromString(provenance.SerializeToString())
    parameters = json_format.MessageToDict(wire.parameters)
    assert json_format.ParseDict(parameters, orchestrator_pb2.PipelineRequest()) == request


def test_a_generate_stream_and_an_upload_carry_one_part_per_message() -> None:
    from kinema.common.v1 import common_pb2
    from kinema.orchestrator.v1 import orchestrator_pb2

    event = orchestrator_pb2.GenerateResponse(progress=common_pb2.Progress(step=3, total=28))
    assert event.WhichOneof("event") == "progress"
    event.result.outputs.add(index=0, seed=7).artifact.sha256 = "c" * 64
    assert event.WhichOneof("event") == "result"
    wire = orchestrator_pb2.GenerateResponse.FromString(event.SerializeToString())
    assert [(o.index, o.seed, o.artifact.sha256) for o in wire.result.outputs] == [(0, 7, "c" * 64)]

    header = orchestrator_pb2.UploadArtifactRequest(header=orchestrator_pb2.UploadHeader(media_type="image/png"))
    assert header.WhichOneof("part") == "header"
    chunk = orchestrator_pb2.UploadArtifactRequest(chunk=b"\x89PNG")
    assert orchestrator_pb2.UploadArtifactRequest.FromString(chunk.SerializeToString()).WhichOneof("part") == "chunk"
