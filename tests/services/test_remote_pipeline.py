"""`text_to_image` over the gRPC clients (`kinema.pipelines.remote`) equals the embedded run, with real
Triton and real service processes; errors come back as Kinema's domain errors."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest
import torch

from kinema.common.v1 import common_pb2
from kinema.errors import DeadlineExceeded, InvalidInput, KinemaError, NotFound
from kinema.pipelines import TextToImageRequest, text_to_image
from kinema.pipelines.local import load_local
from kinema.pipelines.protocols import SampleSpec
from kinema.pipelines.remote import RemoteAutoencoder, RemoteDenoiser, RemoteTextEncoder, connect, open_channel
from kinema.sampling.samplers import initial_noise

pytestmark = pytest.mark.slow

PROMPTS = ["a small red sphere to the left of a blue cube", "two green cones"]


class Recorded:
    """A Denoiser that keeps the latents it returns, to compare both shapes before decoding."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.latents: torch.Tensor | None = None

    @property
    def latent_channels(self) -> int:
        return self.inner.latent_channels

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def sample(self, *args) -> torch.Tensor:
        self.latents = self.inner.sample(*args)
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
def channels(services):
    opened = {name: open_channel(s.address) for name, s in services.items()}
    yield opened
    for c in opened.values():
        c.close()


def test_text_to_image_over_grpc_equals_the_embedded_run(remote, local) -> None:
    request = TextToImageRequest(prompts=PROMPTS, seed=3, steps=8, guidance=4.0)
    (rte, rdn, rae), (lte, ldn, lae) = remote, local
    got_dn, want_dn = Recorded(rdn), Recorded(ldn)
    got = text_to_image(request, rte, got_dn, rae)
    want = text_to_image(request, lte, want_dn, lae)
    np.testing.assert_allclose(got_dn.latents.numpy(), want_dn.latents.numpy(), atol=1e-4)
    assert np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1
    assert (got.seeds, got.truncated) == (want.seeds, want.truncated)
    # Provenance agrees across shapes; the autoencoder's is the embedded one's (sha over encoder + decoder hashes).
    assert got.models == want.models
    assert got.models["text_encoder"] == lte.fingerprint() and got.models["denoiser"] == ldn.fingerprint()
    assert got.models["autoencoder"] == lae.fingerprint() and all(len(h) == 64 for h in got.models.values())


def test_model_facts_come_from_the_services(remote, local, channels) -> None:
    (_, rdn, rae), (_, ldn, lae) = remote, local
    assert (rae.downscale, rae.latent_channels) == (lae.downscale, lae.latent_channels)
    assert rdn.latent_channels == ldn.latent_channels  # under Triton: the autoencoder's, via connect
    # Fresh clients, nothing run yet: fingerprints from ListModels, or probe calls for the autoencoder.
    assert RemoteTextEncoder(channels["text_encoder"]).fingerprint() == local[0].fingerprint()
    assert RemoteDenoiser(channels["denoiser"]).fingerprint() == ldn.fingerprint()
    assert RemoteAutoencoder(channels["autoencoder"]).fingerprint() == lae.fingerprint()
    with pytest.raises(KinemaError) as info:  # Triton publishes no params_json and no fallback was given
        _ = RemoteDenoiser(channels["denoiser"]).latent_channels
    assert info.value.reason == "LATENT_CHANNELS_UNKNOWN"
    assert RemoteDenoiser(channels["denoiser"], latent_channels=4).latent_channels == 4


def test_progress_callback_sees_every_step(remote) -> None:
    seen = []
    request = TextToImageRequest(prompts=["a cube"], steps=5)
    text_to_image(request, *remote, callback=lambda i, n, x: seen.append((i + 1, n, x)))
    assert seen == [(s, 5, None) for s in range(1, 6)]  # stream_latents=False: no tensors per step


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_streamed_latents_equal_the_in_process_callback(channels, local, sampler) -> None:
    lte, ldn, _ = local
    cond, uncond = lte.encode(PROMPTS), lte.encode([""])
    noise = torch.cat([initial_noise((1, 4, 16, 16), s) for s in (1, 2)])
    spec = SampleSpec(steps=4, guidance=4.0, sampler=sampler, shift=3.0)
    got, want = [], []
    denoiser = RemoteDenoiser(channels["denoiser"], stream_latents=True)
    latents = denoiser.sample(noise, cond, uncond, spec, lambda i, n, x: got.append((i, n, x)))
    ldn.sample(noise, cond, uncond, spec, lambda i, n, x: want.append((i, n, x.clone())))
    assert [(i, n) for i, n, _ in got] == [(i, n) for i, n, _ in want] == [(i, 4) for i in range(4)]
    for (_, _, x), (_, _, y) in zip(got, want, strict=True):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-5)  # measured: ~2e-7 over 28 steps
    np.testing.assert_allclose(got[-1][2].numpy(), latents.numpy(), atol=1e-5)


def _model_calls(service) -> float:
    """Denoiser network evaluations so far (as test_model_services reads them)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith('kinema_model_seconds_count{backend="triton",model="denoiser"}'):
            return float(line.split()[-1])
    return 0.0


class JobCancelled(Exception):
    pass


def test_a_raising_callback_cancels_the_call_and_stops_the_service_loop(remote, services) -> None:
    start = _model_calls(services["denoiser"])
    seen = []

    def callback(i: int, n: int, x) -> None:
        seen.append(i + 1)
        if len(seen) == 3:
            raise JobCancelled("job 7 was cancelled")

    try:
        text_to_image(TextToImageRequest(prompts=["a cube"], steps=1000), *remote, callback=callback)
    except JobCancelled as e:
        kept = e  # its traceback keeps the call object alive: only an explicit cancel (not GC) stops the service
    else:
        pytest.fail("the callback's exception did not propagate")
    assert "job 7" in str(kept) and kept.__traceback__ is not None
    time.sleep(0.5)  # let an evaluation in flight finish
    before = _model_calls(services["denoiser"])
    time.sleep(1.5)
    assert _model_calls(services["denoiser"]) == before  # no more network calls after the cancel
    assert seen == [1, 2, 3] and before - start < 2 * 20  # 2 evaluations (CFG) per step, far from 2000


def test_bad_input_raises_the_typed_error_with_reason_and_request_id(remote, services) -> None:
    te, dn, ae = (c.with_request_id("job-7") for c in remote)
    with pytest.raises(InvalidInput) as info:  # the pipeline allows it; the service's batch limit does not
        text_to_image(TextToImageRequest(prompts=["a cube"] * 17, steps=2), te, dn, ae)
    e = info.value
    assert (e.reason, e.field) == ("BATCH_TOO_LARGE", "prompts") and "limit of 16" in str(e)
    assert e.metadata["request_id"] == "job-7" and e.metadata["grpc_code"] == "INVALID_ARGUMENT"

    cond = te.encode(["a cube"])
    with pytest.raises(InvalidInput) as info:
        dn.sample(initial_noise((1, 4, 16, 16), 0), cond, cond, SampleSpec(steps=1001, guidance=4.0), None)
    assert (info.value.reason, info.value.field) == ("OUT_OF_RANGE", "steps") and "1001" in str(info.value)
    with pytest.raises(InvalidInput) as info:
        ae.decode(torch.zeros(1, 3, 16, 16))  # 3 channels for a 4-channel decoder
    assert "Traceback" not in str(info.value)

    # Every call of this job carried its id into the services' logs. A server logs a call once its status is sent,
    # so the client can see the error a moment before the line is written: wait for it, briefly.
    def logged(name: str) -> bool:
        # Only whole lines: the last one may be half-written while the test reads the file.
        lines = [json.loads(line) for line in services[name].log.read_text().splitlines() if line.startswith("{")
                 and line.endswith("}")]  # fmt: skip
        return any(r.get("request_id") == "job-7" for r in lines)

    for name in ("text_encoder", "denoiser", "autoencoder"):
        deadline = time.monotonic() + 5.0
        while not logged(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert logged(name), name


def test_unknown_model_is_not_found(channels) -> None:
    with pytest.raises(NotFound) as info:
        RemoteTextEncoder(channels["text_encoder"], model="clip_l").encode(["a cube"])
    assert (info.value.reason, info.value.field) == ("MODEL_NOT_FOUND", "model.name")
    with pytest.raises(NotFound):
        RemoteDenoiser(channels["denoiser"], version="9").fingerprint()
    with pytest.raises(NotFound):
        _ = RemoteAutoencoder(channels["autoencoder"], model="vae_other").downscale
    noise = initial_noise((1, 4, 16, 16), 0)
    cond = RemoteTextEncoder(channels["text_encoder"]).encode(["a cube"])
    with pytest.raises(NotFound):
        RemoteDenoiser(channels["denoiser"], version="9").sample(noise, cond, cond, SampleSpec(2, 4.0), None)


def test_deadline_is_sent_and_comes_back_as_deadline_exceeded(channels) -> None:
    cond = RemoteTextEncoder(channels["text_encoder"]).encode(["a cube"])
    slow = RemoteDenoiser(channels["denoiser"], timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        slow.sample(initial_noise((1, 4, 16, 16), 0), cond, cond, SampleSpec(steps=1000, guidance=4.0), None)
    assert time.monotonic() - t0 < 5


def _list_models_calls(services) -> dict[str, float]:
    """Each service's count of finished ListModels calls, from its Prometheus metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for name, service in services.items():
        text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
        counts[name] = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                           if s.name == "kinema_rpc_requests_total" and s.labels["method"] == "ListModels")  # fmt: skip
    return counts


def test_a_default_run_names_the_models_that_answered_it_and_asks_no_catalog(services) -> None:
    from kinema.orchestration.capabilities import CAPABILITIES, RemoteCapabilities

    capabilities = RemoteCapabilities({cap: services[cap].address for cap in CAPABILITIES})
    request = TextToImageRequest(prompts=PROMPTS[:1], seed=3, steps=2, guidance=4.0, size=64)

    def run(bound):
        steps = []
        result = text_to_image(request, bound.clients["text_encoder"], bound.clients["denoiser"],
                               bound.clients["autoencoder"], lambda i, n, x: steps.append(i))  # fmt: skip
        assert steps == [0, 1]
        return result

    try:
        run(capabilities.bind(CAPABILITIES, {}, timeout=60))  # a first run learns the latent channels (ListModels)
        bound = capabilities.bind(CAPABILITIES, {}, timeout=60)
        before = _list_models_calls(services)
        result = run(bound)
        assert dict(bound.models) == {"text_encoder": {"name": "text_encoder", "version": "1"},
                                      "denoiser": {"name": "denoiser", "version": "1"},
                                      "autoencoder": {"name": "vae", "version": "1"}}  # fmt: skip
        assert set(result.models) == set(CAPABILITIES) and all(len(sha) == 64 for sha in result.models.values())
        after = _list_models_calls(services)
        assert after == before  # the responses named the models: no ListModels in the whole run
        # What a run that names its models resolves from the catalogs is the same.
        named = {cap: common_pb2.ModelRef(name=ref["name"]) for cap, ref in bound.models.items()}
        assert dict(capabilities.bind(CAPABILITIES, named, timeout=60).models) == dict(bound.models)
    finally:
        capabilities.close()


def test_a_default_run_asks_the_catalog_of_a_service_it_did_not_call(services) -> None:
    from kinema.orchestration.capabilities import CAPABILITIES, RemoteCapabilities

    capabilities = RemoteCapabilities({cap: services[cap].address for cap in CAPABILITIES})
    try:
        bound = capabilities.bind(CAPABILITIES, {}, timeout=60)
        bound.clients["text_encoder"].encode(["a red cube"])
        before = _list_models_calls(services)
        assert bound.models["denoiser"] == {"name": "denoiser", "version": "1"}  # no Sample ran: asked
        assert bound.models["autoencoder"] == {"name": "vae", "version": "1"}  # nor Encode nor Decode: asked
        assert bound.models["text_encoder"]["name"] == "text_encoder"  # the Encode named it
        after = _list_models_calls(services)
        assert {name: after[name] - before[name] for name in after} == {"text_encoder": 0, "denoiser": 1,
                                                                         "autoencoder": 1}  # fmt: skip
    finally:
        capabilities.close()
