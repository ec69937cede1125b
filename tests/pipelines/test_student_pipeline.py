"""text_to_image with a few-step student (embedded): the student loads from the repository as one, samples with
the few-step sampler (fresh noise per image), every image reproduces alone, and what a student cannot do is refused
with the field at fault. The same pipeline runs orchestrated (tests/orchestrator/test_distill_routing.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kinema.cli import main
from kinema.errors import InvalidInput
from kinema.pipelines import ImageToImageRequest, TextToImageRequest, image_to_image, text_to_image
from kinema.pipelines.local import LocalDenoiser, LocalStudent, load_local
from kinema.pipelines.protocols import is_student
from kinema.pipelines.student import RENOISE_SEED_OFFSET, StudentFacts, resolve_timesteps
from kinema.pipelines.text_to_image import finish, sampling_defaults
from kinema.repository import MissingWeights
from kinema.sampling.samplers import initial_noise
from kinema.sampling.student import sample_student

STUDENT_CONFIG = """name: "denoiser_4step"
backend: "python"
max_batch_size: 16
parameters { key: "network" value { string_value: "denoiser" } }
parameters { key: "weights" value { string_value: "mmdit.safetensors" } }
parameters { key: "student_steps" value { string_value: "4" } }
parameters { key: "teacher" value { string_value: "denoiser" } }
"""


@pytest.fixture(scope="module")
def student_models(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny repository plus `denoiser_4step`, a student in the shipped layout (the tiny teacher's weights)."""
    root = tmp_path_factory.mktemp("student-models") / "models"
    shutil.copytree(tiny_models, root)
    (root / "denoiser_4step/1").mkdir(parents=True)
    shutil.copy(root / "denoiser/1/mmdit.safetensors", root / "denoiser_4step/1/mmdit.safetensors")
    (root / "denoiser_4step/config.pbtxt").write_text(STUDENT_CONFIG)
    return root


@pytest.fixture(scope="module")
def student_stack(student_models: Path):
    return load_local(student_models, "denoiser_4step")


def test_a_student_loads_as_one_and_brings_its_own_defaults(student_models, student_stack):
    _, student, _ = student_stack
    assert isinstance(student, LocalStudent) and is_student(student) and student.default_steps == 4
    assert sampling_defaults(student) == (4, 1.0)
    _, teacher, _ = load_local(student_models)
    assert isinstance(teacher, LocalDenoiser) and not is_student(teacher)
    assert sampling_defaults(teacher) == (28, 4.0)
    assert student.fingerprint() == teacher.fingerprint()  # the same file here: the hash names the weights
    with pytest.raises(MissingWeights, match="denoiser_8step"):
        load_local(student_models, "denoiser_8step")


def test_text_to_image_runs_the_few_step_sampler_with_one_stream_per_image(student_stack):
    te, student, ae = student_stack
    request = TextToImageRequest(prompts=["a red cube", "a green cone"], seed=5, steps=4, guidance=1.0)
    seen = []
    result = text_to_image(request, te, student, ae, callback=lambda i, n, x: seen.append((i, n)))
    assert seen == [(i, 4) for i in range(4)] and result.seeds == [5, 6]

    # By hand: kinema.sampling.student with image i re-noised from generator seed_i + 2**63.
    cond = te.encode(request.prompts)
    noise = torch.cat([initial_noise((1, 4, 16, 16), s) for s in (5, 6)])
    gens = [torch.Generator().manual_seed(s + RENOISE_SEED_OFFSET) for s in (5, 6)]
    with torch.inference_mode():
        velocity = lambda x, t: student.model(x, t, cond.tokens, cond.pooled, cond.mask)
        latents = sample_student(velocity, noise, [1.0, 0.75, 0.5, 0.25, 0.0], generator=gens)
    want = finish(latents, [5, 6], cond.truncated, te, student, ae)
    np.testing.assert_array_equal(result.images, want.images)
    assert result.models["denoiser"] == student.fingerprint()

    alone = text_to_image(TextToImageRequest(prompts=["a green cone"], seed=6, steps=4, guidance=1.0), te, student, ae)
    assert np.abs(alone.images[0].astype(int) - result.images[1].astype(int)).max() <= 2  # BLAS rounding only
    two = text_to_image(TextToImageRequest(prompts=["a red cube"], seed=5, steps=2, guidance=1.0), te, student, ae)
    assert not np.array_equal(two.images[0], result.images[0])  # 2 of its times: {1, 0.5}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"guidance": 4.0}, "guidance"),  # the request's default: a caller fills in sampling_defaults instead
        ({"steps": 28}, "steps"),
        ({"steps": 3}, "steps"),  # not a subset of its trained times
        ({"sampler": "heun"}, "sampler"),
        ({"shift": 3.0}, "shift"),
        ({"negative_prompt": "blurry"}, "negative_prompt"),
    ],
)
def test_what_a_student_cannot_do_is_refused_naming_the_field(student_stack, fields, field):
    request = TextToImageRequest(**({"prompts": ["a cube"], "steps": 4, "guidance": 1.0} | fields))
    with pytest.raises(InvalidInput) as info:
        text_to_image(request, *student_stack)
    assert info.value.field == field


def test_edits_need_a_full_denoiser(student_stack):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InvalidInput, match="full denoiser") as info:
        image_to_image(ImageToImageRequest(prompts=["a cube"], image=image, steps=4, guidance=1.0), *student_stack)
    assert (info.value.reason, info.value.field) == ("NOT_FOR_STUDENT", "denoiser")


@pytest.mark.parametrize(
    ("steps", "timesteps", "want"),
    [
        (0, (), [1.0, 0.75, 0.5, 0.25]),
        (2, (), [1.0, 0.5]),
        (1, (), [1.0]),
        (0, (0.9, 0.4), [0.9, 0.4]),
        (2, (1.0, 0.3), [1.0, 0.3]),
    ],
)
def test_resolve_timesteps(steps, timesteps, want):
    assert resolve_timesteps(4, steps, timesteps) == pytest.approx(want)


@pytest.mark.parametrize(
    ("steps", "timesteps", "field", "words"),
    [
        (9, (), "steps", "1..8"),
        (-1, (), "steps", "1..8"),
        (3, (), "steps", "[1, 2, 4]"),
        (8, (), "steps", "[1, 2, 4]"),
        (3, (0.9, 0.4), "steps", "!="),
        (0, (0.5, 0.9), "timesteps", "decreasing"),
        (0, (0.5, 0.5), "timesteps", "decreasing"),
        (0, (1.5, 0.4), "timesteps", "(0, 1]"),
        (0, (0.5, 0.0), "timesteps", "(0, 1]"),
        (0, (float("nan"),), "timesteps", "(0, 1]"),
        (0, tuple(1 - k / 10 for k in range(9)), "timesteps", "at most 8"),
    ],
)
def test_resolve_timesteps_refuses_bad_input(steps, timesteps, field, words):
    with pytest.raises(InvalidInput) as info:
        resolve_timesteps(4, steps, timesteps)
    assert info.value.field == field and words in str(info.value)


def test_student_facts_come_from_the_config():
    assert StudentFacts.from_parameters({"network": "denoiser"}) is None
    facts = StudentFacts.from_parameters({"student_steps": "4", "teacher": "denoiser", "teacher_sha256": "ab"})
    assert facts == StudentFacts(4, "denoiser", "ab")
    assert facts.params() == {"student_steps": 4, "timesteps": [1.0, 0.75, 0.5, 0.25], "teacher": "denoiser",
                              "teacher_sha256": "ab"}  # fmt: skip
    for bad in ("0", "9", "four"):
        with pytest.raises(ValueError, match="student_steps"):
            StudentFacts.from_parameters({"student_steps": bad})


def test_cli_generates_with_a_student_and_its_own_defaults(student_models, tmp_path):
    out = tmp_path / "student.png"
    code = main(["generate", "a red cube", "--denoiser", "denoiser_4step", "--seed", "5", "--models",
                 str(student_models), "-o", str(out), "-q"])  # fmt: skip
    assert code == 0
    params = json.loads(Image.open(out).text["parameters"])
    assert (params["steps"], params["guidance"], params["models"]) == (4, 1.0, {"denoiser": "denoiser_4step"})
    # the pipeline's own run with the same request: the same pixels
    te, student, ae = load_local(student_models, "denoiser_4step")
    want = text_to_image(TextToImageRequest(prompts=["a red cube"], seed=5, steps=4, guidance=1.0), te, student, ae)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), want.images[0])
    assert main(["generate", "a red cube", "--denoiser", "denoiser_4step", "--guidance", "4", "--models",
                 str(student_models), "-o", str(tmp_path / "x.png"), "-q"]) == 2  # fmt: skip


def test_the_shipped_student_names_its_teacher_as_the_repository_serves_it():
    from kinema.repository import default_models_dir, model_parameters

    models = default_models_dir()
    facts = StudentFacts.from_parameters(model_parameters(models, "denoiser_4step"))
    assert facts is not None and (facts.steps, facts.teacher) == (4, "denoiser")
    assert facts.teacher_sha256 == model_parameters(models, "denoiser")["weights_sha256"]
    assert StudentFacts.from_parameters(model_parameters(models, "denoiser")) is None
