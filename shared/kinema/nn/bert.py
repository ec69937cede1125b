"""BERT encoder (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers", sec. 3).

Post-LN transformer layers over word + token-type + absolute position embeddings, exactly as transformers'
`BertModel` computes them, with its parameter names, so HF checkpoints (e.g. all-MiniLM-L6-v2) load unchanged.
Written out because importing `transformers.BertModel` costs seconds of start-up (it pulls in
torch.distributed.tensor, dynamo and the generation utilities) for a 6-layer network.

Inference only: there is no dropout, and the pooler (CLS + tanh, unused by sentence embeddings) is not built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# Checkpoint tensors that `load_bert` accepts and drops: the position index buffer older transformers saved,
# and the next-sentence pooler.
IGNORED_KEYS = frozenset({"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})


@dataclass(frozen=True)
class BertParams:
    """Defaults are BERT-base (and transformers' `BertConfig` defaults)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # exact (erf) GELU; the only activation supported

    def __post_init__(self) -> None:
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; only 'gelu' (exact erf GELU) is")
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if bad := [f"{name}={getattr(self, name)}" for name in sizes if getattr(self, name) < 1]:
            raise ValueError(f"BERT sizes must be positive, got {', '.join(bad)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def params_from_config(config: dict) -> BertParams:
    """BertParams from a transformers BERT `config.json`; ValueError for settings this encoder does not implement."""
    model_type = config.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"model_type {model_type!r} is not supported; only 'bert' checkpoints load natively")
    position = config.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"position_embedding_type {position!r} is not supported; only 'absolute' is")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise ValueError("decoder BERT (is_decoder / add_cross_attention) is not supported; only the encoder is")
    names = {f.name for f in fields(BertParams)}
    return BertParams(**{k: v for k, v in config.items() if k in names})


class Embeddings(nn.Module):
    def __init__(self, p: BertParams) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(p.vocab_size, p.hidden_size)
        self.position_embeddings = nn.Embedding(p.max_position_embeddings, p.hidden_size)
        self.token_type_embeddings = nn.Embedding(p.type_vocab_size, p.hidden_size)
        self.LayerNorm = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        # Summed in transformers' order (word + type, then position) so float rounding matches it.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, L, D)
        return self.LayerNorm(x + self.position_embeddings(positions))  # (B, L, D)


class SelfAttention(nn.Module):
    def __init__(self, p: BertParams) -> None:
        super().__init__()
        self.heads = p.num_attention_heads
        self.query = nn.Linear(p.hidden_size, p.hidden_size)
        self.key = nn.Linear(p.hidden_size, p.hidden_size)
        self.value = nn.Linear(p.hidden_size, p.hidden_size)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.heads) for f in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, L, Dh)
        return rearrange(out, "b h l d -> b l (h d)")  # (B, L, D)


class AddNorm(nn.Module):
    """Projection, residual add, LayerNorm: the post-LN sublayer exit (transformers' BertSelfOutput / BertOutput)."""

    def __init__(self, dim_in: int, p: BertParams) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, p.hidden_size)
        self.LayerNorm = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)  # (B, L, D)


class Attention(nn.Module):
    def __init__(self, p: BertParams) -> None:
        super().__init__()
        self.self = SelfAttention(p)  # named as in transformers' checkpoints: `attention.self.query.weight`
        self.output = AddNorm(p.hidden_size, p)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return self.output(self.self(x, keep), x)  # (B, L, D)


class Intermediate(nn.Module):
    def __init__(self, p: BertParams) -> None:
        super().__init__()
        self.dense = nn.Linear(p.hidden_size, p.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # (B, L, I)


class Layer(nn.Module):
    def __init__(self, p: BertParams) -> None:
        super().__init__()
        self.attention = Attention(p)
        self.intermediate = Intermediate(p)
        self.output = AddNorm(p.intermediate_size, p)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        x = self.attention(x, keep)  # (B, L, D)
        return self.output(self.intermediate(x), x)  # (B, L, D)


class Encoder(nn.Module):
    def __init__(self, p: BertParams) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(p) for _ in range(p.num_hidden_layers))


class Bert(nn.Module):
    """BERT encoder; `state_dict()` keys are those of transformers' `BertModel` without its pooler."""

    def __init__(self, params: BertParams) -> None:
        super().__init__()
        self.params = params
        self.embeddings = Embeddings(params)
        self.encoder = Encoder(params)

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> list[Tensor]:
        """The embedding output and each layer's output, num_hidden_layers + 1 tensors of (B, L, D).

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L) bool or 0/1, true for real tokens; padded keys are masked out (padded queries
                still get an output, which callers should ignore). None attends to every token.
            token_type_ids: (B, L) segment ids; None means all zeros (one segment).
        """
        if input_ids.shape[1] > self.params.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.params.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, L)
        keep = None if attention_mask is None else rearrange(attention_mask.bool(), "b l -> b 1 1 l")  # keys only
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, D)
        states = [x]
        for layer in self.encoder.layer:
            x = layer(x, keep)  # (B, L, D)
            states.append(x)
        return states

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """last_hidden_state (B, L, D); arguments as for `hidden_states`."""
        return self.hidden_states(input_ids, attention_mask, token_type_ids)[-1]


def load_bert(folder: Path) -> Bert:
    """A float32 Bert in eval mode from a transformers folder (config.json + model.safetensors; never pickle).

    Keys may carry the "bert." prefix of transformers' task models; the pooler and position-id buffer are dropped.
    Any other missing, unexpected or misshapen tensor raises ValueError.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"BERT folder {folder} has no {file.name}")
    params = params_from_config(json.loads(config_file.read_text()))
    state = load_file(str(weights_file))
    if state and all(k.startswith("bert.") for k in state):
        state = {k.removeprefix("bert."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}

    model = Bert(params)  # random init costs 0.15 s for MiniLM; building on "meta" would import 1 s of torch
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not fit a BERT with {params}: "
            f"{len(missing)} missing tensors {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    if bad := [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]:
        raise ValueError(f"{weights_file} has tensors of the wrong shape for {params}: {bad[:3]}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)
