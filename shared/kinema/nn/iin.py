"""Invertible interpretation networks: normalising flows, factor layouts and latent editing.

Blocks follow Glow (Kingma & Dhariwal 2018): actnorm with data-dependent init, an invertible
mixing (fixed permutation or LU-parametrised linear, the 1x1 convolution of a vector) and an
affine coupling (RealNVP, Dinh et al. 2017) whose subnet may take a condition (cINN, Ardizzone
et al. 2019). Every block has `forward(x, h) -> (z, logdet)` and a separate `inverse(z, h)`.

`InterpretationNet` puts a flow on top of a fixed representation (here the whitened principal
components of the autoencoder's latent, `LatentBasis`) and splits z into a residual and named
factors (IIN: Esser, Rombach & Ommer 2020); `factorize`, `compose` and `edit` are what the
interpret service calls. A conditional flow translates between representations (net2net:
Rombach, Esser & Ommer 2020) or samples what a representation is invariant to ("Making Sense of
CNNs", Rombach, Esser & Ommer 2020).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIXINGS = ("permute", "lu")


@dataclass(frozen=True)
class FlowParams:
    dim: int = 64  # dimension of x and z
    blocks: int = 8  # actnorm -> mixing -> coupling, this many times
    hidden: int = 256  # coupling subnet width
    depth: int = 2  # hidden layers per coupling subnet
    mixing: str = "lu"  # "permute" (fixed) or "lu" (learned invertible linear)
    clamp: float = 2.0  # log-scales pass through clamp * tanh(s / clamp): bounded, smooth
    cond_dim: int = 0  # 0: unconditional; else the size of the condition vector
    cond_embed: int = 64  # width of the condition embedding every coupling sees
    seed: int = 0  # draws the fixed permutations, so a checkpoint rebuilds the same flow

    def __post_init__(self) -> None:
        if self.dim < 2:
            raise ValueError(f"dim must be >= 2 to split a coupling, got {self.dim}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"unknown mixing {self.mixing!r}; expected one of {MIXINGS}")
        if self.blocks < 1 or self.depth < 1 or self.hidden < 1:
            raise ValueError("blocks, depth and hidden must be >= 1")


class ActNorm(nn.Module):
    """z = (x + b) * exp(s) per dimension; the first training batch sets b, s to whiten it (Glow 3.1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.zeros(()))

    @torch.no_grad()
    def _init(self, x: Tensor) -> None:
        self.bias.copy_(-x.mean(0))
        self.log_scale.copy_(-torch.log(x.std(0) + 1e-6))
        self.initialized.fill_(1.0)

    def forward(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not self.initialized and len(x) > 1:
            self._init(x)
        z = (x + self.bias) * self.log_scale.exp()  # (B, D)
        return z, self.log_scale.sum().expand(len(x))

    def inverse(self, z: Tensor, h: Tensor | None = None) -> Tensor:
        return z * (-self.log_scale).exp() - self.bias


class Permutation(nn.Module):
    """A fixed random permutation of the dimensions (log|det| = 0)."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        perm = torch.randperm(dim, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x[:, self.perm], x.new_zeros(len(x))

    def inverse(self, z: Tensor, h: Tensor | None = None) -> Tensor:
        return z[:, self.inv_perm]


class LUMixing(nn.Module):
    """z = W x with W = P L (U + diag(sign * exp(log_s))): Glow's LU-decomposed 1x1 convolution."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))  # a random rotation to start
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1), persistent=False)
        # L below the diagonal and U above it share one matrix: half the parameters of two.
        self.lu = nn.Parameter(torch.tril(lower, -1) + torch.triu(upper, 1))
        self.log_s = nn.Parameter(diag.abs().log())

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(len(self.log_s), device=self.log_s.device, dtype=self.log_s.dtype)
        lower = self.lu * self.lower_mask + eye
        upper = self.lu * self.lower_mask.T + torch.diag(self.sign * self.log_s.exp())
        return lower, upper

    def forward(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        return x @ (self.p @ lower @ upper).T, self.log_s.sum().expand(len(x))

    def inverse(self, z: Tensor, h: Tensor | None = None) -> Tensor:
        # x = U^-1 L^-1 P^T z by two triangular solves: exact to rounding, no explicit inverse.
        lower, upper = self._factors()
        y = torch.linalg.solve_triangular(lower, self.p.T @ z.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, y, upper=True).T


class AffineCoupling(nn.Module):
    """RealNVP coupling: z2 = x2 * exp(s(x1, h)) + t(x1, h), z1 = x1; conditional when h is given."""

    def __init__(self, dim: int, hidden: int, depth: int, clamp: float, cond: int = 0) -> None:
        super().__init__()
        self.split = dim // 2
        self.clamp = clamp
        layers: list[nn.Module] = []
        width = self.split + cond
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        out = nn.Linear(width, 2 * (dim - self.split))
        nn.init.zeros_(out.weight)  # every coupling starts as the identity
        nn.init.zeros_(out.bias)
        self.subnet = nn.Sequential(*layers, out)

    def _scale_shift(self, x1: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        inp = x1 if h is None else torch.cat([x1, h], -1)
        s, t = self.subnet(inp).chunk(2, -1)  # (B, D - D/2) each
        return self.clamp * torch.tanh(s / self.clamp), t

    def forward(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        s, t = self._scale_shift(x1, h)
        return torch.cat([x1, x2 * s.exp() + t], -1), s.sum(-1)

    def inverse(self, z: Tensor, h: Tensor | None = None) -> Tensor:
        z1, z2 = z[:, : self.split], z[:, self.split :]
        s, t = self._scale_shift(z1, h)
        return torch.cat([z1, (z2 - t) * (-s).exp()], -1)


class Flow(nn.Module):
    """x (B, D) <-> z (B, D); conditional on h (B, cond_dim) when `params.cond_dim` > 0."""

    def __init__(self, params: FlowParams) -> None:
        super().__init__()
        self.params = params
        p = params
        gen = torch.Generator().manual_seed(p.seed)
        cond = p.cond_embed if p.cond_dim else 0
        self.embed = (
            nn.Sequential(nn.Linear(p.cond_dim, 2 * p.cond_embed), nn.SiLU(), nn.Linear(2 * p.cond_embed, p.cond_embed))
            if p.cond_dim
            else None
        )
        layers: list[nn.Module] = []
        for _ in range(p.blocks):
            mixing = LUMixing(p.dim, gen) if p.mixing == "lu" else Permutation(p.dim, gen)
            layers += [ActNorm(p.dim), mixing, AffineCoupling(p.dim, p.hidden, p.depth, p.clamp, cond)]
        self.layers = nn.ModuleList(layers)

    def _embed(self, cond: Tensor | None, batch: int) -> Tensor | None:
        if (cond is None) != (self.embed is None):
            want = f"a condition of size {self.params.cond_dim}" if self.embed is not None else "no condition"
            raise ValueError(f"this flow takes {want}")
        if cond is None:
            return None
        if cond.shape != (batch, self.params.cond_dim):
            raise ValueError(f"condition must be ({batch}, {self.params.cond_dim}), got {tuple(cond.shape)}")
        return self.embed(cond)  # (B, cond_embed)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.params.dim:
            raise ValueError(f"expected (B, {self.params.dim}), got {tuple(x.shape)}")

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(z, log|det dz/dx|) of shapes (B, D) and (B,)."""
        self._check(x)
        h = self._embed(cond, len(x))
        logdet = x.new_zeros(len(x))
        for layer in self.layers:
            x, ld = layer(x, h)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        self._check(z)
        h = self._embed(cond, len(z))
        for layer in reversed(self.layers):
            z = layer.inverse(z, h)
        return z


def standard_normal_nll(z: Tensor, logdet: Tensor) -> Tensor:
    """-log p(x) per dimension in nats: 0.5 |z|^2 + D/2 log(2 pi) - log|det J| (change of variables)."""
    d = z.shape[1]
    return (0.5 * z.pow(2).sum(1) + 0.5 * d * math.log(2 * math.pi) - logdet) / d


@dataclass(frozen=True)
class FactorLayout:
    """z = [residual | factor_1 | ... | factor_K]; names and dimensions of the named blocks."""

    names: tuple[str, ...]
    dims: tuple[int, ...]
    total: int  # = residual + sum(dims)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.dims) or len(set(self.names)) != len(self.names):
            raise ValueError(f"factor names {self.names} and dims {self.dims} must pair up, names unique")
        if any(d < 1 for d in self.dims) or sum(self.dims) > self.total:
            raise ValueError(f"factor dims {self.dims} must be >= 1 and fit in {self.total}")

    @property
    def residual(self) -> int:
        return self.total - sum(self.dims)

    def slice(self, name: str) -> slice:
        if name not in self.names:
            raise KeyError(f"unknown factor {name!r}; this model has {list(self.names)}")
        k = self.names.index(name)
        start = self.residual + sum(self.dims[:k])
        return slice(start, start + self.dims[k])


class LatentBasis(nn.Module):
    """Whitened principal components of flattened latents: x = ((l - mean) V^T) / sigma, l (B, C, h, w).

    `project` also returns what the components leave out, so `reconstruct` is exact.
    """

    def __init__(self, latent_shape: tuple[int, ...], components: int) -> None:
        super().__init__()
        n = math.prod(latent_shape)
        if not 1 <= components <= n:
            raise ValueError(f"components must be in 1..{n}, got {components}")
        self.latent_shape = tuple(latent_shape)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("components", torch.eye(n)[:components])  # (k, n), orthonormal rows
        self.register_buffer("sigma", torch.ones(components))

    @torch.no_grad()
    def fit(self, latents: Tensor) -> Tensor:
        """Fit to (N, C, h, w) latents; returns the explained fraction of variance per component."""
        flat = latents.flatten(1).double()
        mean = flat.mean(0)
        _, s, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        k = len(self.sigma)
        self.mean.copy_(mean.float())
        self.components.copy_(vh[:k].float())
        self.sigma.copy_((s[:k] / math.sqrt(len(flat) - 1)).float())
        return (s.pow(2) / s.pow(2).sum())[:k].float()

    def project(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """(x (B, k) whitened coordinates, rest (B, n) the part outside the components)."""
        centred = latents.flatten(1) - self.mean  # (B, n)
        coords = centred @ self.components.T  # (B, k)
        rest = centred - coords @ self.components
        return coords / self.sigma, rest

    def reconstruct(self, x: Tensor, rest: Tensor | None = None) -> Tensor:
        """Latents (B, C, h, w) from coordinates; `rest` None puts the data mean outside the components."""
        flat = self.mean + (x * self.sigma) @ self.components  # (B, n)
        if rest is not None:
            flat = flat + rest
        return flat.view(len(x), *self.latent_shape)


@dataclass(frozen=True)
class InterpretationParams:
    latent_shape: tuple[int, ...] = (4, 16, 16)
    components: int = 64  # principal components the flow sees
    blocks: int = 8
    hidden: int = 256
    depth: int = 2
    mixing: str = "lu"
    cond_dim: int = 0  # conditional (invariances, net2net) when > 0
    factor_names: tuple[str, ...] = ()
    factor_dims: tuple[int, ...] = ()
    # Per factor, the names of its values (e.g. colour -> red, ...): `edit` sets z_F to their prototypes.
    factor_values: tuple[tuple[str, ...], ...] = ()
    seed: int = 0
    # Whose code of an image this interprets (kinema.train.iin.REPRESENTATIONS): images go through the autoencoder
    # of that name (served: `<representation>_encoder` / `_decoder`).
    representation: str = "vae"

    def flow_params(self) -> FlowParams:
        return FlowParams(
            dim=self.components,
            blocks=self.blocks,
            hidden=self.hidden,
            depth=self.depth,
            mixing=self.mixing,
            cond_dim=self.cond_dim,
            seed=self.seed,
        )

    def layout(self) -> FactorLayout:
        return FactorLayout(self.factor_names, self.factor_dims, self.components)


class AutoencoderLike(Protocol):
    def encode(self, x: Tensor) -> Tensor: ...
    def decode(self, z: Tensor) -> Tensor: ...


class InterpretationNet(nn.Module):
    """Latents <-> (named factors, residual) through a basis and a flow (IIN, Esser et al. 2020, sec. 3)."""

    def __init__(self, params: InterpretationParams) -> None:
        super().__init__()
        self.params = params
        self.layout = params.layout()
        if params.factor_values and len(params.factor_values) != len(params.factor_names):
            raise ValueError("factor_values needs one tuple of value names per factor")
        self.basis = LatentBasis(params.latent_shape, params.components)
        self.flow = Flow(params.flow_params())
        if params.cond_dim:  # conditions are standardised with training statistics (set by the trainer)
            self.register_buffer("cond_shift", torch.zeros(params.cond_dim))
            self.register_buffer("cond_scale", torch.ones(params.cond_dim))
        # Mean z_F per value of each factor (prototypes), measured on training data after fitting.
        for name, values in zip(params.factor_names, params.factor_values, strict=False):
            dims = params.factor_dims[params.factor_names.index(name)]
            self.register_buffer(f"proto_{name}", torch.zeros(len(values), dims))

    def encode(self, latents: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(z (B, k), logdet (B,), rest (B, n)) for latents (B, C, h, w)."""
        x, rest = self.basis.project(latents)
        z, logdet = self.flow(x, self._cond(cond))
        return z, logdet, rest

    def decode(self, z: Tensor, rest: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        return self.basis.reconstruct(self.flow.inverse(z, self._cond(cond)), rest)

    def _cond(self, cond: Tensor | None) -> Tensor | None:
        if cond is None or not self.params.cond_dim:
            return cond  # the flow raises on a missing or unexpected condition
        return (cond - self.cond_shift) / self.cond_scale

    def factorize(self, latents: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """({name: (B, D_F)}, residual (B, R)) — the interpret service's Factorize."""
        z, _, _ = self.encode(latents)
        factors = {name: z[:, self.layout.slice(name)] for name in self.layout.names}
        return factors, z[:, : self.layout.residual]

    def prototypes(self, name: str) -> tuple[tuple[str, ...], Tensor]:
        self.layout.slice(name)  # KeyError for unknown names
        k = self.params.factor_names.index(name)
        if k >= len(self.params.factor_values):
            raise KeyError(f"factor {name!r} has no named values")
        return self.params.factor_values[k], getattr(self, f"proto_{name}")

    def scores(self, latents: Tensor) -> dict[str, Tensor]:
        """Per factor with named values: (B, V) probabilities from the distance of z_F to each prototype."""
        factors, _ = self.factorize(latents)
        out = {}
        for name in self.params.factor_names[: len(self.params.factor_values)]:
            _, proto = self.prototypes(name)
            out[name] = F.softmax(-0.5 * torch.cdist(factors[name], proto).pow(2), -1)
        return out

    def edit(self, latents: Tensor, values: Mapping[str, str | Tensor], mode: str = "set") -> Tensor:
        """Latents with z_F set to a value's prototype (a name) or to / shifted by a (D_F,) or (B, D_F) tensor.

        Everything the flow's components leave out of the latent is kept, so edits touch only the
        modelled part of the representation.
        """
        if mode not in ("set", "shift"):
            raise ValueError(f"mode must be 'set' or 'shift', got {mode!r}")
        z, _, rest = self.encode(latents)
        z = z.clone()
        for name, value in values.items():
            sl = self.layout.slice(name)
            if isinstance(value, str):
                names, proto = self.prototypes(name)
                if value not in names:
                    raise KeyError(f"unknown value {value!r} for factor {name!r}; expected one of {list(names)}")
                value = proto[names.index(value)]
            value = torch.as_tensor(value, dtype=z.dtype, device=z.device)
            if value.shape[-1] != sl.stop - sl.start:
                raise ValueError(f"factor {name!r} has {sl.stop - sl.start} dims, got a value of shape {value.shape}")
            z[:, sl] = value.expand(len(z), -1) + (z[:, sl] if mode == "shift" else 0)
        return self.decode(z, rest)

    def swap(self, latents_a: Tensor, latents_b: Tensor, name: str) -> Tensor:
        """Latents of a with factor `name` taken from b (the IIN paper's factor transfer)."""
        z_a, _, rest = self.encode(latents_a)
        z_b, _, _ = self.encode(latents_b)
        sl = self.layout.slice(name)
        z_a = z_a.clone()
        z_a[:, sl] = z_b[:, sl]
        return self.decode(z_a, rest)

    def sample(self, cond: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Latents drawn given a condition (net2net translation, invariance samples): x = T^-1(z | c)."""
        z = torch.randn(len(cond), self.params.components, generator=generator, device=cond.device) * temperature
        return self.decode(z, None, cond)


@torch.no_grad()
def analyze(autoencoder: AutoencoderLike, net: InterpretationNet, images: Tensor) -> dict[str, Tensor]:
    """Factor scores of images (B, 3, H, W) in [-1, 1]: the interpret service's Analyze."""
    return net.scores(autoencoder.encode(images))


@torch.no_grad()
def edit_images(
    autoencoder: AutoencoderLike, net: InterpretationNet, images: Tensor, values: Mapping[str, str | Tensor]
) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] with the named factors set: the interpret service's Edit."""
    return autoencoder.decode(net.edit(autoencoder.encode(images), values)).clamp(-1, 1)


@torch.no_grad()
def translate(
    autoencoder: AutoencoderLike,
    net: InterpretationNet,
    cond: Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Images (B, 3, H, W) from source representations (B, cond_dim), e.g. sentence embeddings (net2net)."""
    return autoencoder.decode(net.sample(cond, temperature, generator)).clamp(-1, 1)
