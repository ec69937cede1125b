"""Few-step students (LADD, Sauer et al. 2024) as the pipelines and the distill service see them: which served
model is one, and the schedule a request asks of it (the rules of kinema.distill.v1.SampleRequest, kept once here).

A student is a denoiser model whose config carries `student_steps` (the steps it was distilled for) and names its
teacher (`teacher`, `teacher_sha256`); the sampler itself is `kinema.sampling.student.sample_student`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kinema.errors import InvalidInput
from kinema.sampling.student import student_timesteps

MAX_STEPS = 8  # the most steps a student samples (distill.proto SampleRequest.steps)
# Image seeds are < 2**63 (text_to_image's check), so seed + 2**63 seeds a re-noising stream that is never any
# image's initial-noise stream, and still fits the proto's uint64.
RENOISE_SEED_OFFSET = 1 << 63


@dataclass(frozen=True)
class StudentFacts:
    """What a student's config says about it: the steps it was distilled for and its teacher."""

    steps: int
    teacher: str = ""
    teacher_sha256: str = ""

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> StudentFacts | None:
        """The facts in a model's config parameters; None for a model that is not a student."""
        raw = parameters.get("student_steps", "")
        if not raw:
            return None
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_STEPS:
            raise ValueError(f"student_steps must be an integer in 1..{MAX_STEPS}, got {raw!r}")
        return cls(int(raw), parameters.get("teacher", ""), parameters.get("teacher_sha256", ""))

    def params(self) -> dict[str, object]:
        """What ListModels publishes of it (params_json): its teacher and its default schedule."""
        return {"student_steps": self.steps, "timesteps": student_timesteps(self.steps), "teacher": self.teacher,
                "teacher_sha256": self.teacher_sha256}  # fmt: skip


def resolve_timesteps(trained: int, steps: int = 0, timesteps: Sequence[float] = ()) -> list[float]:
    """The start time of each step a request asks of a student distilled for `trained` steps, highest noise first.

    `timesteps` given: used as they are (strictly decreasing, in (0, 1], at most MAX_STEPS; `steps` 0 or their
    count). Else `steps` (0: `trained`) of the times the student was trained at, so `steps` must divide `trained`.
    """
    if not 0 <= steps <= MAX_STEPS:
        raise InvalidInput(f"steps must be in 1..{MAX_STEPS} (0: the student's own {trained}), got {steps}",
                           reason="OUT_OF_RANGE", field="steps")  # fmt: skip
    if timesteps:
        times = [float(t) for t in timesteps]
        if len(times) > MAX_STEPS:
            raise InvalidInput(f"at most {MAX_STEPS} timesteps, got {len(times)}", reason="OUT_OF_RANGE",
                               field="timesteps")  # fmt: skip
        if steps and steps != len(times):
            raise InvalidInput(f"steps {steps} != the {len(times)} timesteps given; leave steps 0 or make them agree",
                               reason="STEPS_MISMATCH", field="steps")  # fmt: skip
        if not all(math.isfinite(t) and 0 < t <= 1 for t in times):
            raise InvalidInput(f"timesteps must each lie in (0, 1], got {times}", reason="OUT_OF_RANGE",
                               field="timesteps")  # fmt: skip
        if any(a <= b for a, b in itertools.pairwise(times)):
            raise InvalidInput(f"timesteps must be strictly decreasing, got {times}", reason="NOT_DECREASING",
                               field="timesteps")  # fmt: skip
        return times
    steps = steps or trained
    if trained % steps:
        allowed = [n for n in range(1, trained + 1) if trained % n == 0]
        raise InvalidInput(
            f"this student was distilled for {trained} steps: steps must be one of {allowed} (the times it was "
            f"trained at), or give explicit timesteps; got {steps}",
            reason="OUT_OF_RANGE",
            field="steps",
        )
    return student_timesteps(steps)


def renoise_seeds(image_seeds: Sequence[int]) -> list[int]:
    """The re-noising seed of each image of a pipeline run: its own stream, so an image reproduces alone."""
    return [s + RENOISE_SEED_OFFSET for s in image_seeds]
