"""The served networks as numpy-in, numpy-out callables: what a Triton model executes, written once.

Each network declares its input and output tensors (names, dtypes, per-item dims) and runs a whole
batch in one torch call. Triton's `models/<name>/1/model.py` builds one of these from its config
`parameters`; the in-process runner (`kinema.inference.runner.LocalRunner`) builds the very same
class from the same config, so served and embedded results agree to float rounding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from kinema.errors import InvalidInput, Unavailable


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: numpy dtype (object = UTF-8 strings) and dims per batch item (-1 = any)."""

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]


def _f32(name: str, *dims: int) -> TensorSpec:
    return TensorSpec(name, np.dtype(np.float32), dims)


class Network:
    """Base: validate a batch against the specs, run it, return named outputs."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[TensorSpec, ...]]
    outputs: ClassVar[tuple[TensorSpec, ...]]

    sha256: str = ""
    params_json: str = "{}"

    def validate(self, inputs: dict[str, np.ndarray]) -> int:
        """Check names, dtypes, ranks, fixed dims and finiteness; returns the batch size."""
        batch = None
        for spec in self.inputs:
            if spec.name not in inputs:
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
    return torch.from_numpy(np.ascontiguousarray(a))


class TextEncoderNetwork(Network):
    """Prompts -> per-token states padded to max_length, mask, pooled vector, truncation flags."""

    name = "text_encoder"

    def __init__(self, version_dir: Path, parameters: dict[str, str]) -> None:
        from kinema.nn.text import TextEncoderParams, load_text_encoder

        kind = parameters.get("kind", "minilm")
        path = parameters.get("path") or None
        if path is not None and not Path(path).is_absolute():
            path = str(version_dir / path)
        # Fixed L across a dynamic batch: every request pads to max_length (padding is masked).
        p = TextEncoderParams(kind=kind, path=path, max_length=int(parameters.get("max_length", "0")) or None,
                              pad_to_max_length=True)  # fmt: skip
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

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in inputs["PROMPT"][:, 0]]
        e = self.encoder.encode(prompts)
        return {
            "TOKENS": e.tokens.numpy(),  # (B, L, D)
            "MASK": e.mask.numpy(),  # (B, L)
            "POOLED": e.pooled.numpy(),  # (B, P)
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

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        f = self.model.params.downscale
        h, w = inputs["IMAGE"].shape[2:]
        if h % f or w % f or h < f or w < f:
            raise InvalidInput(f"vae_encoder: image size {h}x{w} must be a positive multiple of {f}")

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.model.params
        post = self.model.posterior(_tensor(inputs["IMAGE"]))
        mean = (post.mean - p.shift_factor) * p.scaling_factor  # (B, C, h, w), as Autoencoder.encode
        std = torch.exp(0.5 * post.logvar) * p.scaling_factor
        return {"LATENT": mean.numpy(), "LATENT_STD": std.numpy()}


class VaeDecoderNetwork(Network):
    """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (not clamped)."""

    name = "vae_decoder"
    inputs = (_f32("LATENT", -1, -1, -1),)
    outputs = (_f32("IMAGE", 3, -1, -1),)

    def __init__(self, version_dir: Path, parameters: dict[str, str]) -> None:
        file = version_dir / parameters.get("weights", "decoder.safetensors")
        self.model, self.sha256 = _load_autoencoder_half(file, ("decoder.", "post_quant_conv."))
        self.params_json = json.dumps(asdict(self.model.params))

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        c = inputs["LATENT"].shape[1]
        if c != self.model.params.latent_channels:
            raise InvalidInput(f"vae_decoder: latents need {self.model.params.latent_channels} channels, got {c}")

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"IMAGE": self.model.decode(_tensor(inputs["LATENT"])).numpy()}


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

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        p = self.model.params
        x, ctx, mask, pooled = inputs["X"], inputs["CONTEXT"], inputs["CONTEXT_MASK"], inputs["POOLED"]
        if x.shape[1] != p.in_channels:
            raise InvalidInput(f"denoiser: X needs {p.in_channels} channels, got {x.shape[1]}")
        h, w = x.shape[2:]
        if h % p.patch_size or w % p.patch_size or max(h, w) // p.patch_size > p.pos_embed_max_size:
            raise InvalidInput(
                f"denoiser: latent size {h}x{w} must be a multiple of {p.patch_size} "
                f"and at most {p.patch_size * p.pos_embed_max_size}"
            )
        if ctx.shape[2] != p.context_dim or pooled.shape[1] != p.pooled_dim:
            raise InvalidInput(
                f"denoiser: text states need width {p.context_dim} and pooled {p.pooled_dim}, "
                f"got {ctx.shape[2]} and {pooled.shape[1]}"
            )
        if mask.shape[1] != ctx.shape[1]:
            raise InvalidInput(f"denoiser: CONTEXT_MASK length {mask.shape[1]} != CONTEXT length {ctx.shape[1]}")
        t = inputs["T"]
        if (t < 0).any() or (t > 1).any():
            raise InvalidInput("denoiser: T must lie in [0, 1]")

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        v = self.model(
            _tensor(inputs["X"]),
            _tensor(inputs["T"][:, 0]),
            _tensor(inputs["CONTEXT"]),
            _tensor(inputs["POOLED"]),
            _tensor(inputs["CONTEXT_MASK"]),
        )
        return {"VELOCITY": v.numpy()}  # (B, C, h, w)


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

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from kinema.nn.depth import estimate

        return {"DEPTH": estimate(self.model, _tensor(inputs["IMAGE"])).numpy()}  # (B, 1, H, W)


NETWORKS: dict[str, type[Network]] = {
    cls.name: cls for cls in (TextEncoderNetwork, VaeEncoderNetwork, VaeDecoderNetwork, DenoiserNetwork, DepthNetwork)
}


def load_network(kind: str, version_dir: Path, parameters: dict[str, str]) -> Network:
    if kind not in NETWORKS:
        raise ValueError(f"unknown network {kind!r}; known: {sorted(NETWORKS)}")
    return NETWORKS[kind](version_dir, parameters)


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
