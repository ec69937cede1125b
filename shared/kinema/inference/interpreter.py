"""The interpret service's work, written once over any `ModelRunner`: Triton in the stack, in-process torch in
embedded mode (`kinema interpret ...`) and under `KINEMA_BACKEND=local`.

An interpretation model (`IinNetwork`, one Triton model each: `iin_factor`, `iin_net2net`, ...) runs in one
direction per call: factorize (latents -> z) or compose (z -> latents). What it interprets, its factors and their
value names come from its published params (`ModelInfo.params_json`). Images pass through the autoencoder the
model names as its `representation` (Triton models `<representation>_encoder` / `_decoder`): `vae`, the LDM
autoencoder's normalised (4, 16, 16) latents (models that name none), or `vector_ae`, a vector autoencoder's code
(`kinema.nn.vector_ae`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from kinema.errors import DeadlineExceeded, FailedPrecondition, InvalidInput, NotFound, Unavailable
from kinema.inference.runner import ModelRunner, ServedModel

AUTOENCODER = "vae"  # the representation of a model whose params name none
_PROBE_SIZE = 64  # side of the blank image that measures a latent-map autoencoder's downscale once


@dataclass(frozen=True)
class IinModel:
    """A served interpretation model and the params it publishes (`InterpretationParams` as JSON)."""

    served: ServedModel
    latent_shape: tuple[int, ...]
    components: int
    cond_dim: int
    factor_names: tuple[str, ...]
    factor_dims: tuple[int, ...]
    factor_values: tuple[tuple[str, ...], ...]
    representation: str = AUTOENCODER

    @classmethod
    def from_served(cls, served: ServedModel) -> IinModel:
        try:
            p = json.loads(served.params_json or "{}")
            return cls(
                served,
                tuple(p["latent_shape"]),
                int(p["components"]),
                int(p["cond_dim"]),
                tuple(p["factor_names"]),
                tuple(p["factor_dims"]),
                tuple(tuple(v) for v in p["factor_values"]),
                str(p.get("representation", AUTOENCODER)),
            )
        except (KeyError, TypeError, ValueError):
            raise FailedPrecondition(
                f"model {served.name!r} publishes no interpretation params (its config.pbtxt needs params_json: "
                "python -m kinema.inference.model_config --sync)",
                reason="MODEL_NOT_FITTED",
            ) from None

    @property
    def name(self) -> str:
        return self.served.name

    @property
    def residual(self) -> int:
        return self.components - sum(self.factor_dims)

    def block(self, factor: str) -> slice:
        """The dimensions of z that hold `factor` (IIN's z = [residual | factor_1 | ... | factor_K])."""
        k = self.factor_names.index(factor)
        start = self.residual + sum(self.factor_dims[:k])
        return slice(start, start + self.factor_dims[k])


@dataclass(frozen=True)
class FactorReading:
    """How one factor reads in each image: probabilities over its named values."""

    factor: str
    values: tuple[str, ...]
    scores: np.ndarray  # (B, V)

    @property
    def best(self) -> list[str]:
        return [self.values[i] for i in self.scores.argmax(-1)]


@dataclass(frozen=True)
class Analysis:
    factors: list[FactorReading]
    model: ServedModel
    autoencoder: ServedModel


@dataclass(frozen=True)
class Edited:
    images: np.ndarray  # (B, 3, H, W) in [-1, 1]
    model: ServedModel
    autoencoder: ServedModel


@dataclass(frozen=True)
class Factorization:
    factors: np.ndarray  # (B, K, D): every block zero-padded to the largest factor's D
    names: tuple[str, ...]
    residual: np.ndarray  # (B, R)
    outside: np.ndarray  # (B, N)
    model: ServedModel


@dataclass(frozen=True)
class Translation:
    latents: np.ndarray  # (B, C, h, w)
    images: np.ndarray | None  # (B, 3, H, W) in [-1, 1] when decoded
    model: ServedModel
    autoencoder: ServedModel | None


class _Budget:
    """What is left of one operation's time, handed to each of its network calls."""

    def __init__(self, timeout: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request ran out of time between its network calls")
        return left


class Interpreter:
    """Analyze, Edit, Factorize, Compose, Traverse and Translate over a runner's networks.

    Every method takes the model's name and version (empty: newest) and `timeout`, the seconds the whole
    operation may take; errors are Kinema's typed ones (bad input names the request field).
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._sizes: dict[tuple[str, tuple[int, ...]], tuple[int, int]] = {}  # (representation, latent) -> image

    def model(self, name: str, version: str = "") -> IinModel:
        return IinModel.from_served(self.runner.describe(name, version))

    def analyze(self, name: str, version: str, images: np.ndarray, timeout: float | None = None) -> Analysis:
        """Images (B, 3, H, W) in [-1, 1] -> per factor with named values, (B, V) probabilities."""
        budget = _Budget(timeout)
        m = self._valued(self.model(name, version))
        out = self._infer(m, {"LATENT": self._encode(m, images, budget)}, budget)
        bounds = np.cumsum([len(v) for v in m.factor_values])[:-1]
        scores = np.split(out["SCORES"], bounds, axis=1)  # K x (B, V_k)
        readings = [FactorReading(f, v, s) for f, v, s in zip(m.factor_names, m.factor_values, scores, strict=False)]
        return Analysis(readings, m.served, self._autoencoder_info(m))

    def edit(
        self, name: str, version: str, images: np.ndarray, values: Mapping[str, str], timeout: float | None = None
    ) -> Edited:
        """Images with each named factor set to its named value's prototype (IIN factor editing), decoded."""
        budget = _Budget(timeout)
        m = self._valued(self.model(name, version))
        chosen = self._value_indices(m, values)  # (K,) int32, -1 = keep
        f = self._infer(m, {"LATENT": self._encode(m, images, budget)}, budget)
        chosen = np.repeat(chosen[None], len(images), axis=0)  # (B, K)
        latents = self._infer(m, {"Z": f["Z"], "OUTSIDE": f["OUTSIDE"], "VALUES": chosen}, budget)["LATENT"]
        out = self._autoencoder(m, "decoder", {"LATENT": latents}, budget)
        return Edited(np.clip(out["IMAGE"], -1.0, 1.0), m.served, self._autoencoder_info(m))

    def factorize(self, name: str, version: str, latents: np.ndarray, timeout: float | None = None) -> Factorization:
        budget = _Budget(timeout)
        m = self._unconditional(self.model(name, version))
        self._check(latents, (len(latents), *m.latent_shape), "latents")
        out = self._infer(m, {"LATENT": latents}, budget)
        z = out["Z"]  # (B, k)
        width = max(m.factor_dims, default=0)
        factors = np.zeros((len(z), len(m.factor_names), width), np.float32)
        for k, f in enumerate(m.factor_names):
            factors[:, k, : m.factor_dims[k]] = z[:, m.block(f)]
        return Factorization(factors, m.factor_names, z[:, : m.residual], out["OUTSIDE"], m.served)

    def compose(
        self,
        name: str,
        version: str,
        factors: np.ndarray,
        residual: np.ndarray,
        outside: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, ServedModel]:
        """(factors (B, K, D), residual (B, R), outside (B, N) or None: the data mean) -> latents (B, C, h, w)."""
        m = self._unconditional(self.model(name, version))
        b = len(factors)
        self._check(factors, (b, len(m.factor_names), max(m.factor_dims, default=0)), "factors")
        self._check(residual, (b, m.residual), "residual")
        inputs = {"Z": self._z(m, factors, residual)}
        if outside is not None:
            self._check(outside, (b, int(np.prod(m.latent_shape))), "outside")
            inputs["OUTSIDE"] = outside
        return self._infer(m, inputs, _Budget(timeout))["LATENT"], m.served

    def traverse(
        self,
        name: str,
        version: str,
        latents: np.ndarray,
        factor: str,
        shift: bool,
        value: np.ndarray,
        scales: list[float],
        timeout: float | None = None,
    ) -> tuple[np.ndarray, ServedModel]:
        """Latents (B, ...) with `factor` set to (or shifted by) value * scale, per scale: (B, S, ...)."""
        budget = _Budget(timeout)
        m = self._unconditional(self.model(name, version))
        self._check_factor(m, factor, "factor")
        self._check(latents, (len(latents), *m.latent_shape), "latents")
        d, b = m.factor_dims[m.factor_names.index(factor)], len(latents)
        if value.shape not in ((d,), (b, d)):
            raise InvalidInput(f"value: factor {factor!r} has {d} dims; give ({d},) or ({b}, {d}), got "
                               f"{list(value.shape)}", reason="INVALID_SHAPE", field="value")  # fmt: skip
        f = self._infer(m, {"LATENT": latents}, budget)
        scales = scales or [1.0]
        z = np.repeat(f["Z"][:, None], len(scales), axis=1)  # (B, S, k)
        step = np.asarray(scales, np.float32)[None, :, None] * np.broadcast_to(value, (b, d))[:, None]  # (B, S, d)
        block = m.block(factor)
        z[:, :, block] = z[:, :, block] + step if shift else step
        outside = np.repeat(f["OUTSIDE"], len(scales), axis=0)  # item-major, as z below
        out = self._infer(m, {"Z": z.reshape(b * len(scales), -1), "OUTSIDE": outside}, budget)["LATENT"]
        return out.reshape(b, len(scales), *m.latent_shape), m.served

    def translate(
        self,
        name: str,
        version: str,
        source: np.ndarray,
        seed: int = 0,
        temperature: float = 1.0,
        decode: bool = False,
        timeout: float | None = None,
    ) -> Translation:
        """Source representations (B, S) -> target latents x = T^-1(z | source), z ~ N(0, t^2 I) (net2net)."""
        budget = _Budget(timeout)
        m = self.model(name, version)
        if not m.cond_dim:
            raise FailedPrecondition(
                f"model {m.name!r} is not conditional: it translates nothing; Translate needs a model whose "
                "params_json has cond_dim > 0 (ListModels), e.g. iin_net2net",
                reason="MODEL_NOT_CONDITIONAL",
            )
        self._check(source, (len(source), m.cond_dim), "source")
        if not (np.isfinite(temperature) and temperature >= 0):
            raise InvalidInput(f"temperature must be a finite number >= 0, got {temperature}",
                               reason="INVALID_TEMPERATURE", field="temperature")  # fmt: skip
        z = np.stack([np.random.default_rng(seed + i).standard_normal(m.components) for i in range(len(source))])
        z = (z * temperature).astype(np.float32)  # (B, k); item b from seed + b alone
        latents = self._infer(m, {"Z": z, "COND": source}, budget)["LATENT"]
        if not decode:
            return Translation(latents, None, m.served, None)
        images = self._autoencoder(m, "decoder", {"LATENT": latents}, budget)["IMAGE"]
        return Translation(latents, np.clip(images, -1.0, 1.0), m.served, self._autoencoder_info(m))

    # -- helpers ------------------------------------------------------------------------------------

    def _infer(self, m: IinModel, inputs: dict[str, np.ndarray], budget: _Budget) -> dict[str, np.ndarray]:
        return self.runner.infer(m.name, inputs, m.served.version, budget.left())

    def _image_size(self, m: IinModel, budget: _Budget) -> tuple[int, int]:
        """The (H, W) of the images whose codes the model interprets, measured once per representation."""
        key = (m.representation, m.latent_shape)
        if key not in self._sizes:
            if len(m.latent_shape) == 1:  # a vector code: the encoder takes one image size, which it publishes
                side = int(json.loads(self._autoencoder(m, "encoder").params_json or "{}").get("image_size", 0))
                if not side:
                    raise Unavailable(f"the autoencoder {m.representation}_encoder publishes no image_size",
                                      reason="AUTOENCODER_UNAVAILABLE")  # fmt: skip
                self._sizes[key] = (side, side)
            else:  # a latent map: the encoder's downscale, from a blank image
                blank = np.zeros((1, 3, _PROBE_SIZE, _PROBE_SIZE), np.float32)
                probe = self._autoencoder(m, "encoder", {"IMAGE": blank}, budget)
                f = _PROBE_SIZE // probe["LATENT"].shape[2]
                self._sizes[key] = (m.latent_shape[1] * f, m.latent_shape[2] * f)
        return self._sizes[key]

    def _encode(self, m: IinModel, images: np.ndarray, budget: _Budget) -> np.ndarray:
        """The codes (B, *latent_shape) of images of the size the model interprets."""
        size = self._image_size(m, budget)
        if tuple(images.shape[2:]) != size:
            raise InvalidInput(
                f"images: model {m.name!r} interprets {size[0]}x{size[1]} images, got "
                f"{images.shape[2]}x{images.shape[3]}",
                reason="INVALID_IMAGE_SIZE",
                field="images",
                metadata={"height": str(size[0]), "width": str(size[1])},
            )
        out = self._autoencoder(m, "encoder", {"IMAGE": images}, budget)
        return out["LATENT"]

    def _autoencoder(
        self, m: IinModel, half: str, inputs: dict[str, np.ndarray] | None = None, budget: _Budget | None = None
    ):
        """Run (or with no inputs, describe) the encoder or decoder of the model's representation; a missing one is
        the service's problem, not the request's: UNAVAILABLE, not NOT_FOUND."""
        model = f"{m.representation}_{half}"
        try:
            if inputs is None:
                return self.runner.describe(model)
            return self.runner.infer(model, inputs, "", budget.left() if budget else None)
        except NotFound:
            raise Unavailable(
                f"the autoencoder's {half} ({model}) is not served here; the interpret service needs it beside the "
                "interpretation models",
                reason="AUTOENCODER_UNAVAILABLE",
            ) from None

    def _autoencoder_info(self, m: IinModel) -> ServedModel:
        """The autoencoder as one model: the encoder's name and version, sha256 over both halves (as embedded)."""
        from kinema.repository import autoencoder_fingerprint

        enc, dec = self._autoencoder(m, "encoder"), self._autoencoder(m, "decoder")
        return ServedModel(m.representation, enc.version, autoencoder_fingerprint(enc.sha256, dec.sha256),
                           enc.params_json)  # fmt: skip

    @staticmethod
    def _valued(m: IinModel) -> IinModel:
        if not m.factor_values:
            kind = "a conditional model: use Translate" if m.cond_dim else "not fitted to named factors"
            raise FailedPrecondition(
                f"model {m.name!r} has no factors with named values ({kind}); Analyze and Edit need a model fitted "
                "to factors, such as iin_factor",
                reason="MODEL_NOT_FITTED",
            )
        return m

    @staticmethod
    def _unconditional(m: IinModel) -> IinModel:
        if m.cond_dim:
            raise FailedPrecondition(
                f"model {m.name!r} is conditional: what it factorizes depends on a source representation; "
                "use Translate",
                reason="MODEL_CONDITIONAL",
            )
        return m

    @staticmethod
    def _check_factor(m: IinModel, factor: str, field: str) -> None:
        if factor not in m.factor_names:
            allowed = ", ".join(m.factor_names) or "none"
            raise InvalidInput(f"{field}: model {m.name!r} has no factor {factor!r}; its factors: {allowed}",
                               reason="UNKNOWN_FACTOR", field=field)  # fmt: skip

    def _value_indices(self, m: IinModel, values: Mapping[str, str]) -> np.ndarray:
        if not values:
            raise InvalidInput("values: name at least one factor to set, e.g. colour=blue", reason="NO_EDIT",
                               field="values")  # fmt: skip
        chosen = np.full(len(m.factor_values), -1, np.int32)
        for factor, value in values.items():
            self._check_factor(m, factor, "values")
            k = m.factor_names.index(factor)
            names = m.factor_values[k] if k < len(m.factor_values) else ()
            if value not in names:
                raise InvalidInput(
                    f"values: {value!r} is not a value of {factor!r}; one of: {', '.join(names)}",
                    reason="UNKNOWN_VALUE",
                    field="values",
                )
            chosen[k] = names.index(value)
        return chosen

    @staticmethod
    def _check(a: np.ndarray, shape: tuple[int, ...], field: str) -> None:
        if tuple(a.shape) != shape or not shape[0]:
            raise InvalidInput(f"{field}: expected shape {list(shape)}, got {list(a.shape)}", reason="INVALID_SHAPE",
                               field=field)  # fmt: skip

    @staticmethod
    def _z(m: IinModel, factors: np.ndarray, residual: np.ndarray) -> np.ndarray:
        blocks = [factors[:, k, :d] for k, d in enumerate(m.factor_dims)]
        return np.concatenate([residual, *blocks], axis=1).astype(np.float32)  # (B, k)
