"""Load the shipped networks from a Triton-style model repository (`models/<name>/1/*.safetensors`).

The same files Triton serves are what embedded mode loads: one set of weights, two shapes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the loaders import torch lazily, so finding the repository stays cheap (launchers, settings)
    from kinema.nn.autoencoder import Autoencoder
    from kinema.nn.depth import DepthNet
    from kinema.nn.mmdit import MMDiT
    from kinema.nn.text import TextEncoder
    from kinema.nn.video import VideoMMDiT

AUTOENCODER_FILES = ("vae_encoder/1/encoder.safetensors", "vae_decoder/1/decoder.safetensors")
DENOISER_FILE = "denoiser/1/mmdit.safetensors"


class MissingWeights(FileNotFoundError):
    """A shipped weights file is absent from the model repository."""


def default_models_dir() -> Path:
    """`KINEMA_MODELS`, else the `models/` folder of the source checkout."""
    env = os.environ.get("KINEMA_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise MissingWeights(
            f"missing weights {path}; set KINEMA_MODELS to a model repository or run `make weights` to train them"
        )
    return path


def _checked(models: Path, name: str, sha256: str) -> str:
    """`sha256`, once it is known to be the weights that model `name`'s config and model card state when its config
    pins them (`kinema.inference.model_card.check_weights`, as Triton's load checks them); ValueError otherwise."""
    from kinema.inference.model_card import check_weights

    if (models / name / "config.pbtxt").is_file():
        check_weights(models / name, model_parameters(models, name), sha256)
    return sha256


def load_autoencoder(models: Path) -> tuple[Autoencoder, str]:
    """(autoencoder in eval mode, sha256 over its encoder and decoder files)."""
    from safetensors.torch import load_file

    from kinema.nn.autoencoder import Autoencoder, AutoencoderParams
    from kinema.nn.checkpoint import params_from_metadata, sha256_file

    files = [_require(models / f) for f in AUTOENCODER_FILES]
    model = Autoencoder(params_from_metadata(files[0], AutoencoderParams))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    model.load_state_dict(state)
    hashes = [_checked(models, f.split("/")[0], sha256_file(models / f)) for f in AUTOENCODER_FILES]
    return model.eval().requires_grad_(False), autoencoder_fingerprint(*hashes)


def autoencoder_fingerprint(encoder_sha256: str, decoder_sha256: str) -> str:
    """One hash for an autoencoder from its two weight files' hashes (embedded and remote alike)."""
    return hashlib.sha256((encoder_sha256 + decoder_sha256).encode()).hexdigest()


def load_denoiser(models: Path, path: Path | None = None, name: str = "denoiser") -> tuple[MMDiT, str]:
    """(MMDiT in eval mode, sha256 of its file); `path` overrides the repository file (snapshots).

    `name`: another denoiser model of the repository (a variant or a distilled student such as `denoiser_4step`),
    its newest version's weights as its config names them.
    """
    from safetensors.torch import load_file

    from kinema.nn.checkpoint import params_from_metadata, sha256_file
    from kinema.nn.mmdit import MMDiT, MMDiTParams

    in_repository = path is None  # a snapshot given by path is no repository model: nothing states its hash
    if path is None and name != "denoiser":
        from kinema.inference.model_config import latest_version

        weights = model_parameters(models, name).get("weights", "mmdit.safetensors")
        path = models / name / latest_version(models / name) / weights
    file = _require(path or models / DENOISER_FILE)
    model = MMDiT(params_from_metadata(file, MMDiTParams))
    model.load_state_dict(load_file(str(file)))
    sha256 = sha256_file(file)
    return model.eval().requires_grad_(False), _checked(models, name, sha256) if in_repository else sha256


def load_video_denoiser(models: Path, name: str = "video_denoiser") -> tuple[VideoMMDiT, str]:
    """(VideoMMDiT in eval mode, sha256 of its file): the repository model `name`'s newest weights."""
    from kinema.inference.model_config import latest_version
    from kinema.nn.checkpoint import sha256_file
    from kinema.nn.video import load_video_denoiser as load

    if not (models / name).is_dir():
        raise MissingWeights(f"no model {name!r} in the model repository {models}; run `make weights` to train it")
    weights = model_parameters(models, name).get("weights", "video_mmdit.safetensors")
    file = _require(models / name / latest_version(models / name) / weights)
    return load(file), _checked(models, name, sha256_file(file))


def load_depth(models: Path, name: str = "depth") -> tuple[DepthNet, str]:
    """(DepthNet in eval mode, sha256 of its file): the repository model `name`'s newest weights."""
    from kinema.inference.model_config import latest_version
    from kinema.nn.depth import load_depth_net

    if not (models / name).is_dir():
        raise MissingWeights(f"no model {name!r} in the model repository {models}; run `make weights` to train it")
    weights = model_parameters(models, name).get("weights", "depth.safetensors")
    net, sha256 = load_depth_net(_require(models / name / latest_version(models / name) / weights))
    return net, _checked(models, name, sha256)


def model_parameters(models: Path, name: str) -> dict[str, str]:
    """The `parameters` of a repository model's config.pbtxt (what Triton passes to its model.py); {} for the
    default denoiser of a repository that holds only its weights (test repositories)."""
    from kinema.inference.model_config import parameters, read_config

    if not (models / name / "config.pbtxt").is_file():
        if name == "denoiser":
            return {}
        known = sorted(p.parent.name for p in models.glob("*/config.pbtxt"))
        raise MissingWeights(f"no model {name!r} in the model repository {models}; it holds {known}")
    return parameters(read_config(models / name))


def load_text_encoder_default() -> TextEncoder:
    """The packaged all-MiniLM-L6-v2 every mini model is trained with."""
    from kinema.nn.text import TextEncoderParams, load_text_encoder

    return load_text_encoder(TextEncoderParams(kind="minilm"))
