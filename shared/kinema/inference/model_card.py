"""The weights hash a model card states, and the check that loaded weights are the ones it and the config name.

Every model of the repository has a card, `models/<name>/README.md`, saying how its weights were made and what they
score; one row of it, `| weights_sha256 | <64 hex digits> |`, names the weights it describes by their SHA-256 (the
hash of the safetensors file; for shards, `kinema.nn.text.weights_sha256`). A model whose config pins
`weights_sha256` loads only when the weights hash to it and its card states the same hash, so the weights served are
the ones the card, the config and every artifact's provenance name. `python -m kinema.inference.model_config --sync`
writes both after training. Plain text only here: the Triton image loads networks without tritonclient's config
proto.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

CARD = "README.md"
KEY = "weights_sha256"
SYNC = "python -m kinema.inference.model_config --sync MODELS"
_ROW = re.compile(rf"^\|[ \t]*{KEY}[ \t]*\|(.*)\|[ \t]*$", re.MULTILINE)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TABLE = re.compile(r"\|\s*field\s*\|\s*value\s*\|\s*")  # the header write_model_card's table starts with


def stated_sha256(model_dir: Path) -> str:
    """The weights SHA-256 the model's card states; ValueError naming the card when it has none, or not one."""
    card = model_dir / CARD
    if not card.is_file():
        raise ValueError(f"{model_dir.name}: no model card {card}; write one and record its weights with `{SYNC}`")
    rows = [m.group(1).strip().strip("`") for m in _ROW.finditer(card.read_text(encoding="utf-8"))]
    if len(rows) != 1 or not _SHA256.fullmatch(rows[0]):
        found = f"{len(rows)} rows" if len(rows) != 1 else f"{rows[0]!r}"
        raise ValueError(f"{card}: needs one row '| {KEY} | <64 lowercase hex digits> |' naming its weights, found "
                         f"{found}; `{SYNC}` writes it")  # fmt: skip
    return rows[0]


def write_sha256(model_dir: Path, sha256: str) -> Path:
    """Put `sha256` in the card's `weights_sha256` row: replaced where there is one, else added at the end of its
    first `| field | value |` table (a table of its own when it has none; a card of its own when there is none)."""
    card = model_dir / CARD
    row = f"| {KEY} | {sha256} |"
    text = card.read_text(encoding="utf-8") if card.is_file() else f"# {model_dir.name}\n"
    text, n = _ROW.subn(row, text)
    if n > 1:
        raise ValueError(f"{card}: {n} {KEY} rows; keep one")
    if n == 0:
        lines = text.splitlines()
        header = next((i for i, line in enumerate(lines) if _TABLE.fullmatch(line)), None)
        if header is None:
            lines += ["", "| field | value |", "| --- | --- |", row]
        else:
            end = header + 1
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            lines.insert(end, row)
        text = "\n".join(lines) + "\n"
    card.write_text(text, encoding="utf-8")
    return card


def check_weights(model_dir: Path, parameters: Mapping[str, str], sha256: str) -> None:
    """ValueError unless weights hashing to `sha256` are the ones the config (`parameters`) and the model card name.

    Only a config that pins `weights_sha256` asks for it (the shipped models; tests' tiny repositories pin none).
    """
    pinned = parameters.get(KEY, "")
    if not pinned:
        return
    if pinned != sha256:
        raise ValueError(f"{model_dir.name}: weights hash {sha256} != config {KEY} {pinned}; run `{SYNC}` after "
                         "changing weights")  # fmt: skip
    stated = stated_sha256(model_dir)
    if stated != sha256:
        raise ValueError(
            f"{model_dir.name}: the weights hash to {sha256}, but the model card {model_dir / CARD} states {KEY} "
            f"{stated}: they are not the weights the card describes. Serve the card's weights, or, when they were "
            f"replaced on purpose, update the card's results and record the new hash with `{SYNC}`"
        )
