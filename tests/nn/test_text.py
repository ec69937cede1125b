"""Text encoders: the packaged MiniLM against sentence-transformers, tiny random CLIP/T5 against transformers."""

import string
from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from kinema.nn.text import TextEncoder, TextEncoderParams, load_text_encoder, weights_sha256

LONG_PROMPT = " ".join(["a red cube beside a blue sphere"] * 20)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return load_text_encoder(TextEncoderParams(kind="minilm"))


def test_minilm_shapes_and_mask(minilm: TextEncoder) -> None:
    prompts = ["a red cube", "a small blue sphere to the left of a tall green cone"]
    out = minilm.encode(prompts)
    n_tokens = [len(minilm.tokenizer(p)["input_ids"]) for p in prompts]  # includes [CLS] and [SEP]
    assert out.tokens.shape == (2, max(n_tokens), 384) and out.tokens.dtype == torch.float32
    assert out.pooled.shape == (2, 384) and minilm.hidden_size == minilm.pooled_size == 384
    assert out.mask.dtype == torch.bool and out.mask.sum(dim=1).tolist() == n_tokens
    assert out.mask[0, : n_tokens[0]].all() and not out.mask[0, n_tokens[0] :].any()
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(2))
    assert out.truncated == [False, False]


def test_minilm_pooled_matches_sentence_transformers(minilm: TextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    prompts = ["a red cube", "two spheres orbit a yellow cylinder", "camera pans left over green cones"]
    reference = SentenceTransformer(str(minilm.folder), device="cpu", local_files_only=True)
    expected = reference.encode(prompts, convert_to_tensor=True, normalize_embeddings=False)
    torch.testing.assert_close(minilm.encode(prompts).pooled, expected.float(), atol=1e-5, rtol=0)


def test_minilm_similar_captions_are_closer(minilm: TextEncoder) -> None:
    a, b, c = minilm.encode(["a red cube on a table", "a crimson box on a desk", "waves crashing on a beach"]).pooled
    assert torch.dot(a, b) > torch.dot(a, c) + 0.1


def test_minilm_flags_truncation_and_is_deterministic(minilm: TextEncoder) -> None:
    out = minilm.encode(["a red cube", LONG_PROMPT])
    assert out.truncated == [False, True]
    assert out.tokens.shape[1] == minilm.params.max_length and out.mask[1].all()
    torch.testing.assert_close(minilm.encode(["a red cube", LONG_PROMPT]).tokens, out.tokens, atol=0, rtol=0)


def test_fingerprint_is_sha256_of_weights(minilm: TextEncoder) -> None:
    digest = minilm.fingerprint()
    assert len(digest) == 64 and digest == weights_sha256(minilm.folder) and minilm.fingerprint() is digest


def _letter_vocab(specials: list[str], suffix: str) -> list[str]:
    return specials + list(string.ascii_lowercase) + [c + suffix for c in string.ascii_lowercase]


def _tiny_clip(folder: Path, projection: bool) -> None:
    # Character-level BPE (no merges): every letter is a token, enough to exercise padding and truncation.
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(_letter_vocab(specials, "</w>"))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _tiny_t5(folder: Path) -> None:
    pieces = [*_letter_vocab(["<pad>", "</s>", "<unk>"], ""), "▁", "▁a", "▁red", "▁cube", "▁blue", "▁sphere"]
    tokenizer = T5Tokenizer(vocab=[(p, -1.0 if len(p) > 1 else -5.0) for p in pieces], extra_ids=0)
    config = T5Config(vocab_size=len(pieces), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {name: tmp_path_factory.mktemp(name) for name in ("clip_proj", "clip", "t5")}
    _tiny_clip(folders["clip_proj"], projection=True)
    _tiny_clip(folders["clip"], projection=False)
    _tiny_t5(folders["t5"])
    return folders


@pytest.mark.parametrize(
    ("name", "hidden_layer", "pooled_size"),
    [("clip_proj", -1, 16), ("clip_proj", -2, 16), ("clip", -1, 32), ("t5", -1, 32)],
)
def test_tiny_encoder_matches_transformers(
    tiny_folders: dict[str, Path], name: str, hidden_layer: int, pooled_size: int
) -> None:
    kind = "t5" if name == "t5" else "clip"
    encoder = load_text_encoder(TextEncoderParams(kind=kind, path=str(tiny_folders[name]), hidden_layer=hidden_layer))
    prompts = ["a red cube", "a blue sphere beside a red cube"]
    out = encoder.encode(prompts)

    batch = encoder.tokenizer(prompts, padding="longest", return_tensors="pt")
    reference = encoder.model(**batch, output_hidden_states=True)
    length = batch["input_ids"].shape[1]
    assert out.tokens.shape == (2, length, 32) and out.pooled.shape == (2, pooled_size)
    assert encoder.hidden_size == 32 and encoder.pooled_size == pooled_size
    assert torch.equal(out.mask, batch["attention_mask"].bool()) and not out.mask[0].all() and out.mask[1].all()
    tokens = reference.last_hidden_state if hidden_layer == -1 else reference.hidden_states[hidden_layer]
    torch.testing.assert_close(out.tokens, tokens)
    if kind == "t5":  # masked mean over real tokens
        mask = batch["attention_mask"][..., None].float()
        pooled = (reference.last_hidden_state * mask).sum(1) / mask.sum(1)
    else:
        pooled = reference.text_embeds if name == "clip_proj" else reference.pooler_output
    torch.testing.assert_close(out.pooled, pooled)
    assert out.truncated == [False, False]


@pytest.mark.parametrize("name", ["clip_proj", "t5"])
def test_tiny_encoder_pads_to_max_length_and_truncates(tiny_folders: dict[str, Path], name: str) -> None:
    kind = "t5" if name == "t5" else "clip"
    params = TextEncoderParams(kind=kind, path=str(tiny_folders[name]), max_length=24, pad_to_max_length=True)
    out = load_text_encoder(params).encode(["a red cube", LONG_PROMPT])
    assert out.tokens.shape == (2, 24, 32) and out.mask.shape == (2, 24)
    assert out.truncated == [False, True] and out.mask[1].all() and not out.mask[0].all()


def test_missing_path_raises_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_text_encoder(TextEncoderParams(kind="clip", path=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_text_encoder(TextEncoderParams(kind="t5", path=str(tmp_path)))


def test_params_reject_bad_values(tiny_folders: dict[str, Path]) -> None:
    assert TextEncoderParams(kind="clip", path="x").max_length == 77
    with pytest.raises(ValueError, match="needs a model path"):
        TextEncoderParams(kind="t5")
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        TextEncoderParams(kind="bert", path="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exceeds the 77 positions"):
        load_text_encoder(TextEncoderParams(kind="clip", path=str(tiny_folders["clip"]), max_length=100))
    with pytest.raises(ValueError, match="hidden_layer"):
        load_text_encoder(TextEncoderParams(kind="clip", path=str(tiny_folders["clip"]), hidden_layer=-5))
