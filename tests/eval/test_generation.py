import numpy as np
import pytest

from kinema.eval.generation import evaluate_text_to_image, generate_images, held_out_prompts
from kinema.pipelines import TextToImageRequest, text_to_image
from kinema.pipelines.local import load_local


@pytest.fixture(scope="module")
def stack(tiny_models):
    return load_local(tiny_models)


def test_generated_images_follow_the_sampling_settings(stack) -> None:
    prompts, _ = held_out_prompts(3)
    kw = {"steps": 3, "guidance": 2.0, "seed": 4, "batch": 2}
    images = generate_images(prompts, *stack, **kw, sampler="heun", shift=3.0)
    # Prompt i is drawn with seed + i whatever the batching, and with the sampler and shift asked for.
    alone = text_to_image(TextToImageRequest(prompts=prompts[2:], seed=6, steps=3, guidance=2.0, sampler="heun",
                                             shift=3.0), *stack)  # fmt: skip
    assert np.abs(images[2].astype(int) - alone.images[0].astype(int)).max() <= 2  # BLAS rounding across batch sizes
    assert not np.array_equal(images, generate_images(prompts, *stack, **kw, sampler="heun"))
    assert not np.array_equal(images, generate_images(prompts, *stack, **kw, shift=3.0))


def test_evaluation_records_its_sampling_settings(stack) -> None:
    r = evaluate_text_to_image(*stack, n=2, steps=2, guidance=1.5, with_fid=False, sampler="heun", shift=2.0)
    assert {k: r[k] for k in ("n", "steps", "guidance", "sampler", "shift", "split")} == {
        "n": 2, "steps": 2, "guidance": 1.5, "sampler": "heun", "shift": 2.0, "split": "test"}  # fmt: skip
    assert 0.0 <= r["accuracy"]["colour_shape"] <= 1.0 and "fid" not in r
