"""The served networks as numpy-in, numpy-out callables: what a Triton model executes, written once.

Each network declares its input and output tensors (names, dtypes, per-item dims) and runs a whole
batch in one torch call. Triton's `models/<name>/1/model.py` builds one of these from its config
`parameters`; the in-process runner (`kinema.inference.runner.LocalRunner`) builds the very same
class from the same config, so served and embedded results agree to float rounding.

A network is built on the CPU in fp32; `Network.to(device, dtype)` moves it (the Triton glue does, for
a KIND_GPU instance). Inputs arrive as numpy on the CPU and outputs leave as numpy on the CPU, float
outputs in float32 whatever the compute dtype.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from kinema.errors import InvalidInput, Unavailable
from kinema.inference.model_card import check_weights


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: numpy dtype (object = UTF-8 strings) and dims per batch item (-1 = any).

    An optional input may be left out of a request (Triton config `optional: true`); `Network.check` says which
    combinations a network takes.
    """

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]
    optional: bool = False


def _f32(name: str, *dims: int) -> TensorSpec:
    return TensorSpec(name, np.dtype(np.float32), dims)


class Network:
    """Base: validate a batch against the specs, run it, return named outputs."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[TensorSpec, ...]]
    outputs: ClassVar[tuple[TensorSpec, ...]]

    sha256: str = ""
    params_json: str = "{}"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # the compute dtype of float tensors

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules `to` moves (override)."""
        return []

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Network:
        """Move the network's modules to `device` and cast their floating-point weights to `dtype`."""
        device = torch.device(device)
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        return self

    def tensor(self, a: np.ndarray) -> torch.Tensor:
        """A numpy input as a tensor on this network's device, floats in its compute dtype."""
        t = _tensor(a)
        if t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    def validate(self, inputs: dict[str, np.ndarray]) -> int:
        """Check names, dtypes, ranks, fixed dims and finiteness; returns the batch size."""
        batch = None
        for spec in self.inputs:
            if spec.name not in inputs:
                if spec.optional:
                    continue
                raise InvalidInput(f"{self.name}: missing input {spec.name}")
            a = inputs[spec.name]
            if spec.dtype == np.dtype(object):
                if a.dtype != object and a.dtype.kind not in "SU":
                    raise InvalidInput(f"{self.name}: {spec.name} must hold strings, got {a.dtype}")
            elif a.dtype != spec.dtype:
                raise InvalidInput(f"{self.name}: {spec.name} must be {spec.dtype}, got {a.dtype}")
            if a.ndim != len(spec.dims) + 1:
                raise InvalidInput(
                    f"{self.name}: {spec.name} must have shape (B, {', '.join(map(str, spec.dims))}), got {a.shape}"
                )
            for want, got in zip(spec.dims, a.shape[1:], strict=True):
                if want != -1 and want != got:
                    raise InvalidInput(f"{self.name}: {spec.name} must have shape (B, {spec.dims}), got {a.shape}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise InvalidInput(f"{self.name}: {spec.name} contains NaN or Inf")
            if batch is None:
                batch = a.shape[0]
            elif a.shape[0] != batch:
                raise InvalidInput(f"{self.name}: {spec.name} has batch {a.shape[0]}, expected {batch}")
        if not batch:
            raise InvalidInput(f"{self.name}: empty batch")
        self.check(inputs)
        return batch

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Network-specific checks beyond the specs (override)."""

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A numpy input as a CPU tensor sharing its memory when it is contiguous (`Network.tensor` moves and casts it)."""
    return torch.from_numpy(np.ascontiguousarray(a))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """An output back on the CPU as numpy; floats as float32 (the served dtype) whatever they were computed in."""
    t = t.detach()
    return (t.float() if t.is_floating_point() else t).cpu().numpy()


class TextEncoderNetwork(Network):
    """Prompts -> per-token states padded to max_length, mask, pooled vector, truncation flags."""

    name = "text_encoder"

    def __init__(self, version_dir: Path, parameters: dict[str, str]) -> None:
        from kinema.nn.text import TextEncoderParams, load_text_encoder

        kind = parameters.get("kind", "minilm")
        path = parameters.get("path") or None
        if path is not None and not Path(path).is_absolute():
            path = str(version_dir / path)
        # The encoder runs at the batch's longest prompt, as embedded mode does (padding to max_length first
        # fed MiniLM 32 tokens for a typical 13-token prompt); the outputs are then padded to max_length, masked, so
        # every response of a dynamic batch has the same fixed L whatever it was batched with.
        p = TextEncoderParams(kind=kind, path=path, max_length=int(parameters.get("max_length", "0")) or None)
        self.encoder = load_text_encoder(p)
        self.max_length = p.max_length
        self.sha256 = self.encoder.fingerprint()
        self.params_json = json.dumps(asdict(p))
        d, pd = self.encoder.hidden_size, self.encoder.pooled_size
        self.outputs = (
            _f32("TOKENS", p.max_length, d),
            TensorSpec("MASK", np.dtype(bool), (p.max_length,)),
            _f32("POOLED", pd),
            TensorSpec("TRUNCATED", np.dtype(bool), (1,)),
        )

    inputs = (TensorSpec("PROMPT", np.dtype(object), (1,)),)

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder.model]  # the encoder runs where its model is (TextEncoder.encode)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in inputs["PROMPT"][:, 0]]
        e = self.encoder.encode(prompts)
        pad = self.max_length - e.tokens.shape[1]
        return {
            "TOKENS": _numpy(torch.nn.functional.pad(e.tokens, (0, 0, 0, pad))),  # (B, max_length, D), zeros after L
            "MASK": _numpy(torch.nn.functional.pad(e.mask, (0, pad))),  # (B, max_length), False after L
            "POOLED": _numpy(e.pooled),  # (B, P)
            "TRUNCATED": np.array(e.truncated, dtype=bool)[:, None],  # (B, 1)
        }


def _load_autoencoder_half(file: Path, prefixes: tuple[str, ...]):
    """An Autoencoder with only the half stored in `file` loaded (the other half stays unused)."""
    from safetensors.torch import load_file

    from kinema.nn.autoencoder import Autoencoder, AutoencoderParams
    from kinema.nn.checkpoint import params_from_metadata, sha256_file

    if not file.is_file():
        raise Unavailable(f"missing weights {file}")
    model = Autoencoder(params_from_metadata(file, AutoencoderParams))
    state = load_file(str(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(prefixes) for k in missing):
        raise Unavailable(f"{file} does not hold the {prefixes[0].rstrip('.')} weights")
    return model.eval().requires_grad_(False), sha256_file(file)


class VaeEncoderNetwork(Network):
    """Images (B, 3, H, W) in [-1, 1] -> normalised posterior mean and std (B, C, H/f, W/f)."""

    name = "vae_encoder"
    inputs = (_f32("IMAGE", 3, -1, -1),)
    outputs = (_f32("LATENT", -1, -1, -1), _f32("LATENT_STD", -1, -1, -1))

    def __init__(self, version_dir: Path, parameters: dict[str, str]) -> None:
        file = version_dir / parameters.get("weights", "encoder.safetensors")
        self.model, self.sha256 = _load_autoencoder_half(file, ("encoder.", "quant_conv."))
        self.params_json = json.dumps(asdict(self.model.params))

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        f = self.model.params.downscale
        h, w = inputs["IMAGE"].shape[2:]
        if h % f or w % f or h < f or w < f:
            raise InvalidInput(f"vae_encoder: image size {h}x{w} must be a positive multiple of {f}")

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.model.params
        post = self.model.posterior(self.tensor(inputs["IMAGE"]))
        mean = (post.mean - p.shift_factor) * p.scaling_factor  # (B, C, h, w), as Autoencoder.encode
        std = torch.exp(0.5 * post.logvar) * p.scaling_factor
        return {"LATENT": _numpy(mean), "LATENT_STD": _numpy(std)}


class VaeDecoderNetwork(Network):
    """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (not clamped)."""

    name = "vae_decoder"
    inputs = (_f32("LATENT", -1, -1, -1),)
    outputs = (_f32("IMAGE", 3, -1, -1),)

    def __init__(self, version_dir: Path, parameters: dict[str, str]) -> None:
        file = version_dir / parameters.get("weights", "decoder.safetensors")
        self.model, self.sha256 = _load_autoencoder_half(file, ("decoder.", "post_quant_conv."))
        self.params_json = json.dumps(asdict(self.model.params))

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        c = inputs["LATENT"].shape[1]
        if c != self.model.params.latent_channels:
            raise InvalidInput(f"vae_decoder: latents need {self.model.params.latent_channels} channels, got {c}")

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"IMAGE": _numpy(self.model.decode(self.tensor(inputs["LATENT"])))}


def check_latent_and_text(name: str, p: Any, channels: int, h: int, w: int, inputs: dict[str, np.ndarray],
                          what: str) -> None:  # fmt: skip
    """The checks an MMDiT's inputs share (image or video): latent channels and size against the params (`p`, an
    MMDiTParams), CONTEXT / POOLED widths and CONTEXT_MASK's length; InvalidInput prefixed with the model `name`."""
    ctx, mask, pooled = inputs["CONTEXT"], inputs["CONTEXT_MASK"], inputs["POOLED"]
    if channels != p.in_channels:
        raise InvalidInput(f"{name}: X needs {p.in_channels} channels, got {channels}")
    if h % p.patch_size or w % p.patch_size or max(h, w) // p.patch_size > p.pos_embed_max_size:
        raise InvalidInput(
            f"{name}: latent size {h}x{w} must be a multiple of {p.patch_size} "
            f"and at most {p.patch_size * p.pos_embed_max_size}"
        )
    if ctx.shape[2] != p.context_dim or pooled.shape[1] != p.pooled_dim:
        raise InvalidInput(
            f"{name}: {what} states need width {p.context_dim} and pooled {p.pooled_dim}, "
            f"got {ctx.shape[2]} and {pooled.shape[1]}"
        )
    if mask.shape[1] != ctx.shape[1]:
        raise InvalidInput(f"{name}: CONTEXT_MASK length {mask.shape[1]} != CONTEXT length {ctx.shape[1]}")


class DenoiserNetwork(Network):
    """One MMDiT evaluation: velocity v(x_t, t | text) for a batch (SD3 rectified flow)."""

    name = "denoiser"
    inputs = (
        _f32("X", -1, -1, -1),
        _f32("T", 1),
        _f32("CONTEXT", -1, -1),
        TensorSpec("CONTEXT_MASK", np.dtype(bool), (-1,)),
        _f32("POOLED", -1),
    )
    outputs = (_f32("VELOCITY", -1, -1, -1),)

    def __init__(self, version_dir: Path, parameters: dict[str, str]) -> None:
        from safetensors.torch import load_file

        from kinema.nn.checkpoint import params_from_metadata, sha256_file
        from kinema.nn.mmdit import MMDiT, MMDiTParams

        file = version_dir / parameters.get("weights", "mmdit.safetensors")
        if not file.is_file():
            raise Unavailable(f"missing weights {file}")
        self.model = MMDiT(params_from_metadata(file, MMDiTParams))
        self.model.load_state_dict(load_file(str(file)))
        self.model.eval().requires_grad_(False)
        self.sha256 = sha256_file(file)
        self.params_json = json.dumps(asdict(self.model.params))

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        p = self.model.params
        x = inputs["X"]
        check_latent_and_text("denoiser", p, x.shape[1], *x.shape[2:], inputs, "text")
        t = inputs["T"]
        if (t < 0).any() or (t > 1).any():
            raise InvalidInput("denoiser: T must lie in [0, 1]")

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        v = self.model(
            self.tensor(inputs["X"]),
            self.tensor(inputs["T"][:, 0]),
            self.tensor(inputs["CONTEXT"]),
            self.tensor(inputs["POOLED"]),
            self.tensor(inputs["CONTEXT_MASK"]),
        )
        return {"VELOCITY": _numpy(v)}  # (B, C, h, w)


VIDEO_VELOCITY_INPUTS = ("T", "CONTEXT", "CONTEXT_MASK", "POOLED", "TEMPORAL")  # what X needs beside it


class VideoDenoiserNetwork(Network):
    """One video MMDiT evaluation per request (Gen-1), a clip per batch row; or a reference frame's content.

    Velocity: X (F, C, h, w), T (1), CONTEXT (L, Dc), CONTEXT_MASK (L), POOLED (Dp), TEMPORAL (1) and optionally
    STRUCTURE (F, S, h, w) and STRUCTURE_LEVEL (1) -> VELOCITY (F, C, h, w), exactly `VideoMMDiT.forward` per row
    (TEMPORAL may differ between rows of a dynamic batch: each value runs as its own forward pass).
    Content: REFERENCE_LATENT (C, h, w) alone -> CONTENT_TOKENS (G, Dc), CONTENT_MASK (G), CONTENT_POOLED (Dp),
    `VideoMMDiT.reference`. The content MLP is part of the velocity network's weights, so it is one more request
    kind of this model (as IinNetwork serves two directions) rather than a model of its own: a second Triton
    model would need its own copy of the weights (Triton reads each model folder alone, from S3 too), which could
    then differ from the network that reads the content.
    """

    name = "video_denoiser"
    inputs = (
        TensorSpec("X", np.dtype(np.float32), (-1, -1, -1, -1), optional=True),
        TensorSpec("T", np.dtype(np.float32), (1,), optional=True),
        TensorSpec("CONTEXT", np.dtype(np.float32), (-1, -1), optional=True),
        TensorSpec("CONTEXT_MASK", np.dtype(bool), (-1,), optional=True),
        TensorSpec("POOLED", np.dtype(np.float32), (-1,), optional=True),
        TensorSpec("STRUCTURE", np.dtype(np.float32), (-1, -1, -1, -1), optional=True),
        TensorSpec("STRUCTURE_LEVEL", np.dtype(np.float32), (1,), optional=True),
        TensorSpec("TEMPORAL", np.dtype(bool), (1,), optional=True),
        TensorSpec("REFERENCE_LATENT", np.dtype(np.float32), (-1, -1, -1), optional=True),
    )
    outputs = (
        _f32("VELOCITY", -1, -1, -1, -1),
        _f32("CONTENT_TOKENS", -1, -1),
        TensorSpec("CONTENT_MASK", np.dtype(bool), (-1,)),
        _f32("CONTENT_POOLED", -1),
    )

    def __init__(self, version_dir: Path, parameters: dict[str, str]) -> None:
        from kinema.nn.checkpoint import sha256_file
        from kinema.nn.video import load_video_denoiser

        file = version_dir / parameters.get("weights", "video_mmdit.safetensors")
        if not file.is_file():
            raise Unavailable(f"missing weights {file}")
        self.model, self.sha256 = load_video_denoiser(file), sha256_file(file)
        self.params_json = json.dumps(asdict(self.model.params))

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        p = self.model.params
        if ("X" in inputs) == ("REFERENCE_LATENT" in inputs):
            raise InvalidInput("video_denoiser: give X (velocity) or REFERENCE_LATENT (content), exactly one of them")
        if "REFERENCE_LATENT" in inputs:
            if len(inputs) > 1:
                raise InvalidInput(f"video_denoiser: REFERENCE_LATENT goes alone, got {sorted(inputs)}")
            c, h, w = inputs["REFERENCE_LATENT"].shape[1:]
            if c != p.in_channels or h * w < 2:
                raise InvalidInput(f"video_denoiser: REFERENCE_LATENT needs {p.in_channels} channels and at least "
                                   f"2 pixels, got shape {inputs['REFERENCE_LATENT'].shape}")  # fmt: skip
            return
        if missing := [k for k in VIDEO_VELOCITY_INPUTS if k not in inputs]:
            raise InvalidInput(f"video_denoiser: X needs {', '.join(missing)} too")
        x = inputs["X"]
        b, f, c, h, w = x.shape
        if not 1 <= f <= p.max_frames:
            raise InvalidInput(f"video_denoiser: X has {f} frames, the model takes 1..{p.max_frames}")
        check_latent_and_text("video_denoiser", p, c, h, w, inputs, "content")
        want = (b, f, p.structure_channels, h, w)  # (B, F, S, h, w)
        if "STRUCTURE" in inputs and (not p.structure_channels or inputs["STRUCTURE"].shape != want):
            raise InvalidInput(f"video_denoiser: STRUCTURE must have shape {want}, got {inputs['STRUCTURE'].shape}")
        for name in ("T", "STRUCTURE_LEVEL"):
            v = inputs.get(name)
            if v is not None and ((v < 0).any() or (v > 1).any()):
                raise InvalidInput(f"video_denoiser: {name} must lie in [0, 1]")

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "REFERENCE_LATENT" in inputs:
            tokens, mask, pooled = self.model.reference(self.tensor(inputs["REFERENCE_LATENT"]))
            return {"CONTENT_TOKENS": _numpy(tokens), "CONTENT_MASK": _numpy(mask), "CONTENT_POOLED": _numpy(pooled)}
        temporal = inputs["TEMPORAL"][:, 0]  # (B,)
        velocity = np.empty(inputs["X"].shape, np.float32)  # (B, F, C, h, w)
        for flag in np.unique(temporal):  # one forward pass per temporal flag (usually the whole batch)
            rows = slice(None) if (temporal == flag).all() else np.flatnonzero(temporal == flag)
            part = {k: self.tensor(v[rows]) for k, v in inputs.items() if k != "TEMPORAL"}
            level = part.get("STRUCTURE_LEVEL")
            v = self.model(
                part["X"],  # (b, F, C, h, w)
                part["T"][:, 0],  # (b,)
                part["CONTEXT"],  # (b, L, Dc)
                part["POOLED"],  # (b, Dp)
                part["CONTEXT_MASK"],  # (b, L)
                structure=part.get("STRUCTURE"),  # (b, F, S, h, w) or None
                structure_level=None if level is None else level[:, 0],  # (b,) or None
                temporal=bool(flag),
            )
            velocity[rows] = _numpy(v)
        return {"VELOCITY": velocity}  # (B, F, C, h, w)


class DepthNetwork(Network):
    """Images (B, 3, H, W) in [-1, 1], any size -> relative inverse depth (B, 1, H, W), larger = nearer."""

    name = "depth"
    inputs = (_f32("IMAGE", 3, -1, -1),)
    outputs = (_f32("DEPTH", 1, -1, -1),)

    def __init__(self, version_dir: Path, parameters: dict[str, str]) -> None:
        from kinema.nn.depth import load_depth_net

        file = version_dir / parameters.get("weights", "depth.safetensors")
        if not file.is_file():
            raise Unavailable(f"missing weights {file}")
        self.model, self.sha256 = load_depth_net(file)
        self.params_json = json.dumps(asdict(self.model.params))

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from kinema.nn.depth import estimate

        return {"DEPTH": _numpy(estimate(self.model, self.tensor(inputs["IMAGE"])))}  # (B, 1, H, W)


class _VectorAeHalf(Network):
    """One half of the vector autoencoder (`kinema.nn.vector_ae`), as the vae halves are served."""

    half = ""

    def __init__(self, version_dir: Path, parameters: dict[str, str]) -> None:
        from kinema.train.vector_ae import load_half

        file = version_dir / parameters.get("weights", f"{self.half}.safetensors")
        self.model, self.sha256 = load_half(file, self.half)
        self.params_json = json.dumps(asdict(self.model.params))
        s, d = self.model.params.image_size, self.model.params.dim
        image, code = _f32("IMAGE", 3, s, s), _f32("LATENT", d)
        self.inputs, self.outputs = ((image,), (code,)) if self.half == "encoder" else ((code,), (image,))

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]


class VectorAeEncoderNetwork(_VectorAeHalf):
    """Images (B, 3, S, S) in [-1, 1] -> codes (B, dim)."""

    name = "vector_ae_encoder"
    half = "encoder"

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"LATENT": _numpy(self.model.encode(self.tensor(inputs["IMAGE"])))}


class VectorAeDecoderNetwork(_VectorAeHalf):
    """Codes (B, dim) -> images (B, 3, S, S) in [-1, 1] (not clamped)."""

    name = "vector_ae_decoder"
    half = "decoder"

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"IMAGE": _numpy(self.model.decode(self.tensor(inputs["LATENT"])))}


class IinNetwork(Network):
    """An invertible interpretation network over autoencoder latents, run in either direction.

    Factorize: LATENT (C, h, w) -> Z (k), OUTSIDE (n: the part of the flattened latent outside the model's
    principal components) and, for a model whose factors have named values, SCORES (the probabilities over each
    factor's values, concatenated in factor order). Compose: Z [+ OUTSIDE] -> LATENT, the exact inverse when
    OUTSIDE is the one Factorize gave (left out: the data mean); VALUES (one int32 per factor with named values,
    -1 = keep) first sets z_F to that value's prototype. A conditional model (net2net, invariances) takes COND
    in both directions. IIN: Esser, Rombach & Ommer 2020; net2net: Rombach, Esser & Ommer 2020.
    """

    name = "iin"

    def __init__(self, version_dir: Path, parameters: dict[str, str]) -> None:
        from kinema.nn.checkpoint import sha256_file
        from kinema.train.iin import load_iin

        file = version_dir / parameters.get("weights", "iin.safetensors")
        if not file.is_file():
            raise Unavailable(f"missing weights {file}")
        self.model, self.sha256 = load_iin(file), sha256_file(file)
        p = self.model.params
        self.params_json = json.dumps(asdict(p))
        self.valued = p.factor_names[: len(p.factor_values)]  # the factors with named values, in order
        n, k = int(np.prod(p.latent_shape)), p.components
        optional = {"dtype": np.dtype(np.float32), "optional": True}
        self.inputs = (
            TensorSpec("LATENT", dims=tuple(p.latent_shape), **optional),
            TensorSpec("Z", dims=(k,), **optional),
            TensorSpec("OUTSIDE", dims=(n,), **optional),
            *([TensorSpec("VALUES", np.dtype(np.int32), (len(self.valued),), optional=True)] if self.valued else []),
            *([_f32("COND", p.cond_dim)] if p.cond_dim else []),
        )
        scores = [_f32("SCORES", sum(len(v) for v in p.factor_values))] if self.valued else []
        self.outputs = (_f32("Z", k), _f32("OUTSIDE", n), *scores, _f32("LATENT", *p.latent_shape))

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        if ("LATENT" in inputs) == ("Z" in inputs):
            raise InvalidInput("iin: give LATENT (factorize) or Z (compose), exactly one of them")
        if "LATENT" in inputs and ({"OUTSIDE", "VALUES"} & set(inputs)):
            raise InvalidInput("iin: OUTSIDE and VALUES go with Z (compose), not with LATENT")
        if "VALUES" in inputs:
            counts = np.array([len(v) for v in self.model.params.factor_values])
            values = inputs["VALUES"]
            if (values < -1).any() or (values >= counts).any():
                raise InvalidInput(f"iin: VALUES must lie in [-1, V_F) with V_F = {counts.tolist()}")

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = self.model
        cond = self.tensor(inputs["COND"]) if "COND" in inputs else None
        if "LATENT" in inputs:
            latents = self.tensor(inputs["LATENT"])  # (B, C, h, w)
            z, _, outside = m.encode(latents, cond)  # (B, k), (B, n)
            out = {"Z": _numpy(z), "OUTSIDE": _numpy(outside)}
            if self.valued:
                out["SCORES"] = _numpy(torch.cat(list(m.scores(latents).values()), -1))  # (B, sum V_F)
            return out
        z = self.tensor(inputs["Z"]).clone()  # (B, k)
        for f, name in enumerate(self.valued if "VALUES" in inputs else ()):
            chosen = self.tensor(inputs["VALUES"][:, f].astype(np.int64))  # (B,)
            _, prototypes = m.prototypes(name)  # (V_F, D_F)
            block = m.layout.slice(name)
            z[:, block] = torch.where(chosen[:, None] < 0, z[:, block], prototypes[chosen.clamp(min=0)])
        outside = self.tensor(inputs["OUTSIDE"]) if "OUTSIDE" in inputs else None
        return {"LATENT": _numpy(m.decode(z, outside, cond))}  # (B, C, h, w)


NETWORKS: dict[str, type[Network]] = {
    cls.name: cls
    for cls in (
        TextEncoderNetwork,
        VaeEncoderNetwork,
        VaeDecoderNetwork,
        DenoiserNetwork,
        VideoDenoiserNetwork,
        DepthNetwork,
        IinNetwork,
        VectorAeEncoderNetwork,
        VectorAeDecoderNetwork,
    )
}


def load_network(kind: str, version_dir: Path, parameters: dict[str, str]) -> Network:
    """The network of a model version. A config that pins `weights_sha256` must name the weights, as must the model
    card beside it (`kinema.inference.model_card.check_weights`); one that publishes `params_json`, their params."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network {kind!r}; known: {sorted(NETWORKS)}")
    network = NETWORKS[kind](version_dir, parameters)
    check_weights(version_dir.parent, parameters, network.sha256)
    published = parameters.get("params_json")
    if published and json.loads(published) != json.loads(network.params_json):
        raise ValueError(
            f"{version_dir.parent.name}: config params_json differs from the params in the weights; "
            "run `python -m kinema.inference.model_config --sync MODELS` after changing weights"
        )
    return network


def run_batch(network: Network, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | Exception]:
    """Run many requests (Triton's dynamic batch) in as few calls as shapes allow.

    Each request is validated alone, so a bad one gets its own error and the rest still run;
    requests whose per-item shapes agree are concatenated into one forward pass and split back.
    """
    results: list[dict[str, np.ndarray] | Exception] = [None] * len(requests)  # type: ignore[list-item]
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, req in enumerate(requests):
        try:
            n = network.validate(req)
        except InvalidInput as e:
            results[i] = e
            continue
        key = tuple((name, req[name].shape[1:]) for name in sorted(req))
        groups.setdefault(key, []).append((i, n))
    for members in groups.values():
        names = list(requests[members[0][0]])
        batch = {k: np.concatenate([requests[i][k] for i, _ in members]) for k in names}
        try:
            out = network(batch)
        except Exception as e:  # reported per request; the caller maps it to a status
            for i, _ in members:
                results[i] = e
            continue
        start = 0
        for i, n in members:
            results[i] = {k: v[start : start + n] for k, v in out.items()}
            start += n
    return results
