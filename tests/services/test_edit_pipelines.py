"""image_to_image and inpaint over the gRPC clients equal the embedded runs (real Triton, real service processes):
the denoiser service starts from given latents at a given step and applies the inpainting blend in its own loop."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from kinema.denoiser.v1 import denoiser_pb2, denoiser_pb2_grpc
from kinema.pipelines import (
    ImageToImageRequest,
    InpaintRequest,
    TextToImageRequest,
    image_to_image,
    inpaint,
    text_to_image,
)
from kinema.pipelines.local import load_local
from kinema.pipelines.protocols import SampleSpec
from kinema.pipelines.remote import RemoteDenoiser, connect, open_channel
from kinema.rpc import tensors
from kinema.rpc.status import parse_error_detail
from kinema.sampling.samplers import initial_noise

# The embedded side computes with one torch thread, as each Triton instance does (config.pbtxt torch_threads), so that
# float sums round alike: with two threads a latent came out 1.05e-5 apart, past the 1e-5 checked here.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

STEPS = 6


class Recorded:
    """A Denoiser that keeps the latents it returns, to compare both shapes before decoding."""

    def __init__(self, inner) -> None:
        self.inner, self.latents = inner, None

    @property
    def latent_channels(self) -> int:
        return self.inner.latent_channels

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def sample(self, *args, **edit) -> torch.Tensor:
        self.latents = self.inner.sample(*args, **edit)
        return self.latents


@pytest.fixture(scope="module")
def local():
    return load_local()


@pytest.fixture(scope="module")
def remote(services):
    clients = connect(services["text_encoder"].address, services["denoiser"].address, services["autoencoder"].address)
    yield clients
    for c in clients:
        c.close()


@pytest.fixture(scope="module")
def picture(local) -> np.ndarray:
    return text_to_image(TextToImageRequest(prompts=["a blue cube"], steps=STEPS, seed=11), *local).images[0]


def both(run, request, local, remote):
    """(served, embedded) results and their sampled latents."""
    (rte, rdn, rae), (lte, ldn, lae) = remote, local
    got_dn, want_dn = Recorded(rdn), Recorded(ldn)
    got, want = run(request, rte, got_dn, rae), run(request, lte, want_dn, lae)
    return got, want, got_dn.latents, want_dn.latents


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_image_to_image_served_equals_embedded(local, remote, picture, sampler) -> None:
    request = ImageToImageRequest(prompts=["a green cone", "a red sphere"], image=picture, strength=0.6, steps=STEPS,
                                  seed=3, sampler=sampler)  # fmt: skip
    got, want, got_latents, want_latents = both(image_to_image, request, local, remote)
    np.testing.assert_allclose(got_latents.numpy(), want_latents.numpy(), rtol=0, atol=1e-5)
    assert np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1
    assert (got.seeds, got.models) == (want.seeds, want.models)


def test_inpaint_served_equals_embedded(local, remote, picture) -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    request = InpaintRequest(prompts=["a yellow cone"], image=picture, mask=mask, strength=0.9, steps=STEPS, seed=5)
    got, want, got_latents, want_latents = both(inpaint, request, local, remote)
    np.testing.assert_allclose(got_latents.numpy(), want_latents.numpy(), rtol=0, atol=1e-5)
    assert np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1


def test_streamed_latents_follow_the_edit(local, services) -> None:
    """With previews the client rebuilds each step's x_t, also when the run skips steps and blends."""
    _, ldn, _ = local
    te, _, _ = local
    cond, uncond = te.encode(["a cube"]), te.encode([""])
    noise, init = initial_noise((1, 4, 16, 16), 0), initial_noise((1, 4, 16, 16), 1)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    spec = SampleSpec(steps=5, guidance=4.0, start_step=2)
    channel = open_channel(services["denoiser"].address)
    got, want = [], []
    try:
        denoiser = RemoteDenoiser(channel, stream_latents=True)
        denoiser.sample(noise, cond, uncond, spec, lambda i, n, x: got.append((i, n, x)), init_latents=init, mask=mask)
    finally:
        channel.close()
    ldn.sample(noise, cond, uncond, spec, lambda i, n, x: want.append((i, n, x.clone())), init_latents=init, mask=mask)
    assert [(i, n) for i, n, _ in got] == [(i, n) for i, n, _ in want] == [(0, 3), (1, 3), (2, 3)]
    for (_, _, g), (_, _, w) in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)


def _request(**change) -> denoiser_pb2.SampleRequest:
    cond = denoiser_pb2.Conditioning(tokens=tensors.encode(np.zeros((1, 3, 384), np.float32)),
                                     mask=tensors.encode(np.ones((1, 3), bool)),
                                     pooled=tensors.encode(np.zeros((1, 384), np.float32)))  # fmt: skip
    request = denoiser_pb2.SampleRequest(noise=tensors.encode(np.zeros((1, 4, 16, 16), np.float32)), cond=cond,
                                         steps=4, guidance=1.0)  # fmt: skip
    for name, value in change.items():
        if isinstance(value, np.ndarray):
            getattr(request, name).CopyFrom(tensors.encode(value))
        else:
            setattr(request, name, value)
    return request


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"start_step": 4}, "start_step"),
        ({"start_step": -1}, "start_step"),
        ({"start_step": 1}, "init_latents"),  # skipping steps needs latents to start from
        ({"mask": np.ones((1, 1, 16, 16), np.float32)}, "init_latents"),
        ({"init_latents": np.zeros((1, 4, 8, 8), np.float32)}, "init_latents"),
        ({"init_latents": np.full((1, 4, 16, 16), np.nan, np.float32)}, "init_latents"),
        ({"init_latents": np.zeros((1, 4, 16, 16), np.float32), "mask": np.ones((1, 1, 8, 8), np.float32)}, "mask"),
        (
            {"init_latents": np.zeros((1, 4, 16, 16), np.float32), "mask": np.full((1, 1, 16, 16), 2, np.float32)},
            "mask",
        ),
    ],
)
def test_bad_edit_fields_are_invalid_argument_naming_the_field(services, change, field) -> None:
    with grpc.insecure_channel(services["denoiser"].address) as channel:
        stub = denoiser_pb2_grpc.DenoiserStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Sample(_request(**change), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert parse_error_detail(info.value.trailing_metadata()).field == field
