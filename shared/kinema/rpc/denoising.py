"""What the denoiser and distill services share: a velocity network whose evaluations are model-runner calls, and
text conditioning decoded off the wire (`kinema.denoiser.v1.Conditioning`, which the distill service reuses)."""

from __future__ import annotations

import time

import numpy as np
import torch

from kinema.denoiser.v1 import denoiser_pb2 as pb
from kinema.errors import DeadlineExceeded, InvalidInput
from kinema.inference.runner import ModelRunner
from kinema.nn.text import TextEmbedding
from kinema.rpc import tensors


class RunnerNetwork:
    """A velocity network whose every evaluation is one runner call (Triton's `denoiser`, or a student)."""

    def __init__(self, runner: ModelRunner, model: str, version: str, deadline: float) -> None:
        self.runner, self.model, self.version, self.deadline = runner, model, version, deadline

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 context_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed during sampling")
        inputs = {
            "X": x.numpy(),  # (B, C, h, w)
            "T": t[:, None].numpy(),  # (B, 1)
            "CONTEXT": context.numpy(),  # (B, L, D)
            "CONTEXT_MASK": context_mask.numpy(),  # (B, L)
            "POOLED": pooled.numpy(),  # (B, P)
        }
        return torch.from_numpy(self.runner.infer(self.model, inputs, self.version, left)["VELOCITY"])


def conditioning(c: pb.Conditioning, field: str) -> TextEmbedding:
    """A request's text conditioning, checked: tokens (B, L, D), mask (B, L) and pooled (B, P) agree, B > 0."""
    tokens = tensors.decode(c.tokens, f"{field}.tokens", np.float32, ndim=3)  # (B, L, D)
    mask = tensors.decode(c.mask, f"{field}.mask", np.bool_, ndim=2)  # (B, L)
    pooled = tensors.decode(c.pooled, f"{field}.pooled", np.float32, ndim=2)  # (B, P)
    b, length = tokens.shape[:2]
    if mask.shape != (b, length) or pooled.shape[0] != b or b == 0:
        raise InvalidInput(
            f"{field}: tokens {tokens.shape}, mask {mask.shape} and pooled {pooled.shape} must agree on (B, L), B > 0",
            reason="INVALID_SHAPE", field=field,
        )  # fmt: skip
    return TextEmbedding(torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(pooled), [False] * b)
