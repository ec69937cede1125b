"""What the denoiser and distill services share: a velocity network whose evaluations are model-runner calls, and
text conditioning decoded off the wire (`kinema.denoiser.v1.Conditioning`, which the distill service reuses); and the
video network the denoiser's SampleVideo runs over the runner (`RunnerVideoNetwork`)."""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from kinema.denoiser.v1 import denoiser_pb2 as pb
from kinema.errors import DeadlineExceeded, InvalidInput, Unavailable
from kinema.inference.runner import ModelRunner
from kinema.nn.text import TextEmbedding
from kinema.nn.video import VideoMMDiTParams
from kinema.rpc import tensors


class RunnerNetwork:
    """A velocity network whose every evaluation is one runner call (Triton's `denoiser`, or a student); each call is
    bounded by the request's deadline."""

    def __init__(self, runner: ModelRunner, model: str, version: str, deadline: float) -> None:
        self.runner, self.model, self.version, self.deadline = runner, model, version, deadline

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed during sampling")
        return self.runner.infer(self.model, inputs, self.version, left)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 context_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        inputs = {
            "X": x.numpy(),  # (B, C, h, w)
            "T": t[:, None].numpy(),  # (B, 1)
            "CONTEXT": context.numpy(),  # (B, L, D)
            "CONTEXT_MASK": context_mask.numpy(),  # (B, L)
            "POOLED": pooled.numpy(),  # (B, P)
        }
        return torch.from_numpy(self._infer(inputs)["VELOCITY"])


def video_params(params_json: str, model: str) -> VideoMMDiTParams:
    """A video model's params from the `params_json` its config publishes (lists become tuples, as in checkpoints)."""
    try:
        params = json.loads(params_json or "null")
        return VideoMMDiTParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    except (AttributeError, TypeError, ValueError) as e:  # absent, not a dict, unknown keys, bad values
        raise Unavailable(f"video model {model!r} does not publish valid params (config params_json): {e}") from None


class RunnerVideoNetwork(RunnerNetwork):
    """A `kinema.pipelines.local.VideoNetwork` whose every evaluation, and `reference`, is one runner call (Triton's
    `video_denoiser`); `params` are the ones the model publishes. Each call is bounded by the request's deadline."""

    def __init__(self, runner: ModelRunner, model: str, version: str, deadline: float,
                 params: VideoMMDiTParams) -> None:  # fmt: skip
        super().__init__(runner, model, version, deadline)
        self.params = params

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 context_mask: torch.Tensor | None = None, *, structure: torch.Tensor | None = None,
                 structure_level: torch.Tensor | None = None, temporal: bool = True) -> torch.Tensor:  # fmt: skip
        b = x.shape[0]
        if context_mask is None:  # VideoMMDiT's None: every token attends
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool)
        inputs = {
            "X": x.numpy(),  # (B, F, C, h, w)
            "T": t.expand(b)[:, None].numpy(),  # (B, 1)
            "CONTEXT": context.numpy(),  # (B, L, D)
            "CONTEXT_MASK": context_mask.numpy(),  # (B, L)
            "POOLED": pooled.numpy(),  # (B, P)
            "TEMPORAL": np.full((b, 1), temporal),  # (B, 1)
        }
        if structure is not None:
            inputs["STRUCTURE"] = structure.numpy()  # (B, F, S, h, w)
        if structure_level is not None:
            inputs["STRUCTURE_LEVEL"] = structure_level.expand(b)[:, None].numpy()  # (B, 1)
        return torch.from_numpy(self._infer(inputs)["VELOCITY"])  # (B, F, C, h, w)

    def reference(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reference frame's latent (B, C, h, w) -> content (tokens (B, G, D), mask (B, G), pooled (B, P))."""
        out = self._infer({"REFERENCE_LATENT": latent.numpy()})
        return tuple(torch.from_numpy(out[k]) for k in ("CONTENT_TOKENS", "CONTENT_MASK", "CONTENT_POOLED"))


def conditioning(c: pb.Conditioning, field: str) -> TextEmbedding:
    """A request's text conditioning, checked: tokens (B, L, D), mask (B, L) and pooled (B, P) agree, B, L > 0."""
    tokens = tensors.decode(c.tokens, f"{field}.tokens", np.float32, ndim=3)  # (B, L, D)
    mask = tensors.decode(c.mask, f"{field}.mask", np.bool_, ndim=2)  # (B, L)
    pooled = tensors.decode(c.pooled, f"{field}.pooled", np.float32, ndim=2)  # (B, P)
    b, length = tokens.shape[:2]
    if mask.shape != (b, length) or pooled.shape[0] != b or b == 0 or length == 0:
        raise InvalidInput(
            f"{field}: tokens {tokens.shape}, mask {mask.shape} and pooled {pooled.shape} must agree on (B, L), with "
            "B > 0 and L > 0 (the text encoder gives at least one token per prompt)",
            reason="INVALID_SHAPE", field=field,
        )  # fmt: skip
    return TextEmbedding(torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(pooled), [False] * b)
