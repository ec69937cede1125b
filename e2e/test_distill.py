"""A few-step student through the orchestrator: listed among the denoiser's models, sampled by the distill service.

The local stack and the chart both serve the shipped 4-step student (Triton model `denoiser_4step`, the distill
service, KINEMA_DISTILL_URL on the orchestrator), so a platform that does not list it fails here rather than skips.
"""

from __future__ import annotations

import io
import json
import urllib.request

from google.protobuf import json_format
from PIL import Image

from kinema.common.v1 import common_pb2
from kinema.orchestrator.v1 import orchestrator_pb2 as pb

STUDENT = "denoiser_4step"


def test_a_run_naming_the_student_samples_its_own_four_steps(kinema) -> None:
    (denoiser,) = kinema.call("ListModels", pb.ListModelsRequest(capability="denoiser")).capabilities
    listed = {m.name: m for m in denoiser.models}
    assert denoiser.available and STUDENT in listed, f"the platform serves no {STUDENT}: {sorted(listed)}"
    # The distill service's entry (the denoiser service lists the same Triton model without its schedule): without
    # it the orchestrator has no distill service to send the run to.
    assert json.loads(listed[STUDENT].params_json or "{}").get("student_steps") == 4, listed[STUDENT]

    models = {"denoiser": common_pb2.ModelRef(name=STUDENT)}
    *progress, last = kinema.generate(prompts=["a small red sphere to the left of a blue cube"], seed=21, models=models)
    assert [(e.progress.step, e.progress.total) for e in progress] == [(i, 4) for i in range(1, 5)]  # steps unset
    (output,) = last.result.outputs
    p = output.provenance
    assert (p.models["denoiser"].name, p.models["denoiser"].sha256) == (STUDENT, listed[STUDENT].sha256)
    params = json_format.MessageToDict(p.parameters)
    assert (params["steps"], params["guidance"]) == (4, 1)  # the student's own: 4 steps, no guidance
    data = urllib.request.urlopen(output.presigned_url, timeout=60).read()
    assert Image.open(io.BytesIO(data)).format == "PNG" and len(data) == output.artifact.size_bytes

    # The recorded request names the student and makes the very same image again.
    again = kinema.call("Generate", pb.GenerateRequest(request=json_format.ParseDict(params, pb.PipelineRequest())))
    assert list(again)[-1].result.outputs[0].artifact.sha256 == output.artifact.sha256
