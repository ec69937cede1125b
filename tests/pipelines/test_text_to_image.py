import numpy as np
import pytest
import torch

from kinema.errors import InvalidInput
from kinema.pipelines import TextToImageRequest, text_to_image
from kinema.pipelines.local import load_local
from kinema.pipelines.text_to_image import check_prompts, encode_with_negative


@pytest.fixture(scope="module")
def stack(tiny_models):
    return load_local(tiny_models)


def test_images_shape_and_provenance(stack) -> None:
    r = text_to_image(TextToImageRequest(prompts=["a red cube", "a blue sphere"], steps=3), *stack)
    assert r.images.shape == (2, 64, 64, 3) and r.images.dtype == np.uint8
    assert r.seeds == [0, 1]
    assert set(r.models) == {"text_encoder", "denoiser", "autoencoder"}
    assert all(len(h) == 64 for h in r.models.values())


def test_seed_reproduces_bit_for_bit_and_is_independent_of_batch(stack) -> None:
    a = text_to_image(TextToImageRequest(prompts=["a red cube", "a green cone"], seed=5, steps=3), *stack)
    b = text_to_image(TextToImageRequest(prompts=["a red cube", "a green cone"], seed=5, steps=3), *stack)
    np.testing.assert_array_equal(a.images, b.images)
    single = text_to_image(TextToImageRequest(prompts=["a green cone"], seed=6, steps=3), *stack)
    # Same noise, same image; only BLAS rounding differs between batch sizes.
    assert np.abs(single.images[0].astype(int) - a.images[1].astype(int)).max() <= 2
    other = text_to_image(TextToImageRequest(prompts=["a red cube"], seed=99, steps=3), *stack)
    assert not np.array_equal(other.images[0], a.images[0])


def test_guidance_and_sampler_change_the_result(stack) -> None:
    base = TextToImageRequest(prompts=["a red cube"], steps=3, guidance=1.0)
    plain = text_to_image(base, *stack).images
    guided = text_to_image(TextToImageRequest(prompts=["a red cube"], steps=3, guidance=7.0), *stack).images
    heun = text_to_image(TextToImageRequest(prompts=["a red cube"], steps=3, guidance=1.0, sampler="heun"), *stack)
    assert not np.array_equal(plain, guided)
    assert not np.array_equal(plain, heun.images)


def test_size_changes_the_output(stack) -> None:
    r = text_to_image(TextToImageRequest(prompts=["a red cube"], steps=2, size=32), *stack)
    assert r.images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"guidance": -1.0}, "guidance"),
        ({"guidance": float("nan")}, "guidance"),
        ({"size": 60}, "size must be a multiple of 8"),
        ({"size": 1024}, "size must be a multiple of 8"),
        ({"sampler": "ddim"}, "sampler"),
        ({"prompts": []}, "at least one prompt"),
    ],
)
def test_bad_requests_are_rejected_with_a_clear_message(stack, kwargs, message) -> None:
    req = TextToImageRequest(**({"prompts": ["a red cube"]} | kwargs))
    with pytest.raises(InvalidInput, match=message):
        text_to_image(req, *stack)


def test_long_prompt_is_truncated_and_flagged(stack) -> None:
    long = "a red cube " * 40
    r = text_to_image(TextToImageRequest(prompts=[long, "a red cube"], steps=1), *stack)
    assert r.truncated == [True, False]


def test_prompts_over_the_limit_are_refused_naming_the_field_the_limit_and_the_length() -> None:
    check_prompts(["x" * 10, ""], 10, negative_prompt="y" * 10)  # at the limit
    check_prompts(["\U0001f7e5" * 10], 10)  # characters, not bytes: 40 bytes of UTF-8
    for prompts, negative, field, length in ((["ok", "x" * 11], "", "prompts[1]", 11),
                                             (["ok"], "y" * 4000, "negative_prompt", 4000)):  # fmt: skip
        with pytest.raises(InvalidInput) as e:
            check_prompts(prompts, 10, negative_prompt=negative)
        assert (e.value.reason, e.value.field) == ("PROMPT_TOO_LONG", field)
        assert e.value.metadata == {"limit": "10", "length": str(length), "setting": "KINEMA_MAX_PROMPT_CHARS"}
        assert str(e.value).startswith(f"{field} has {length} characters, over this server's limit of 10 "
                                       "(KINEMA_MAX_PROMPT_CHARS); shorten it")  # fmt: skip


class Counting:
    """The real text encoder, with the batch of every call it gets kept."""

    def __init__(self, inner) -> None:
        self.inner, self.batches = inner, []

    def encode(self, prompts):
        self.batches.append(len(prompts))
        return self.inner.encode(prompts)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()


def test_prompts_and_negative_are_encoded_in_one_call_with_the_rows_of_two(stack) -> None:
    encoder = Counting(stack[0])
    prompts = ["a small red sphere to the left of a blue cube", "two green cones"]
    cond, uncond = encode_with_negative(encoder, prompts, "blurry")
    assert encoder.batches == [3]
    alone, negative = stack[0].encode(prompts), stack[0].encode(["blurry"])
    torch.testing.assert_close(cond.tokens, alone.tokens, atol=1e-5, rtol=0)
    assert torch.equal(cond.mask, alone.mask) and cond.truncated == alone.truncated
    # The negative row keeps the batch's token length; past its own tokens it is masked.
    n = negative.tokens.shape[1]
    assert uncond.tokens.shape == (1, cond.tokens.shape[1], 384) and not uncond.mask[:, n:].any()
    torch.testing.assert_close(uncond.tokens[:, :n], negative.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(uncond.pooled, negative.pooled, atol=1e-5, rtol=0)
    r = text_to_image(TextToImageRequest(prompts=prompts[:1], steps=2), encoder, *stack[1:])
    assert encoder.batches[1:] == [2] and r.images.shape == (1, 64, 64, 3)
