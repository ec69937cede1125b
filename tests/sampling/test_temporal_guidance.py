import pytest
import torch

from kinema.nn.mmdit import MMDiT
from kinema.nn.video import VideoMMDiT, VideoMMDiTParams, branch_predictor
from kinema.sampling import cfg_velocity, get_schedule, initial_noise, sample_euler, sample_heun
from kinema.sampling.edit import noised
from kinema.sampling.temporal import (
    COND_FRAME,
    COND_VIDEO,
    UNCOND_FRAME,
    needed_branches,
    sample_video,
    temporal_guidance_velocity,
    video_schedule,
)

SAMPLERS = {"euler": sample_euler, "heun": sample_heun}
PARAMS = VideoMMDiTParams(depth=2, hidden_size=32, num_heads=2, sample_size=8, pos_embed_max_size=16, max_frames=8)
WEIGHTS = [(1.0, 0.0), (4.0, 0.0), (1.0, 1.0), (1.0, 2.5), (4.0, 1.5), (0.0, 0.5)]


def _models() -> tuple[MMDiT, VideoMMDiT]:
    """A random image MMDiT with a signal, and the video model built on its weights with open temporal gates."""
    torch.manual_seed(0)
    image = MMDiT(PARAMS.image_params()).eval()
    with torch.no_grad():
        for p in image.parameters():
            torch.nn.init.normal_(p, std=0.05)
    video = VideoMMDiT(PARAMS).eval()
    video.load_image_weights(image.state_dict())
    with torch.no_grad():
        for p in video.temporal_blocks.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return image, video


def _content(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = (torch.randn(b, 5, 384, generator=g), torch.ones(b, 5, dtype=torch.bool), torch.randn(b, 384, generator=g))
    null = (torch.randn(1, 3, 384, generator=g), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 384, generator=g))
    return cond, null


def test_the_combination_and_its_special_cases():
    uf, cf, cv = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([4.0])
    # v_uf + w (v_cf - v_uf) + w_t (v_cv - v_cf) = 1 + 2 * 2 + 3 * 1
    assert torch.equal(temporal_guidance_velocity(uf, cf, cv, 2.0, 3.0), torch.tensor([8.0]))
    assert torch.equal(temporal_guidance_velocity(uf, cf, None, 2.0, 0.0), cfg_velocity(cf, uf, 2.0))
    assert torch.equal(temporal_guidance_velocity(None, cf, cv, 1.0, 1.0), cv)  # the plain video model
    assert torch.equal(temporal_guidance_velocity(None, cf, cv, 1.0, 0.5), torch.tensor([3.5]))  # Gen-1 as written
    with pytest.raises(ValueError, match="unconditional"):
        temporal_guidance_velocity(None, cf, cv, 2.0, 1.0)
    with pytest.raises(ValueError, match="video velocity"):
        temporal_guidance_velocity(uf, cf, None, 2.0, 1.0)
    assert needed_branches(1.0, 1.0) == (COND_VIDEO,)
    assert needed_branches(4.0, 0.0) == (COND_FRAME, UNCOND_FRAME)
    assert needed_branches(1.0, 2.0) == (COND_FRAME, COND_VIDEO)
    assert needed_branches(4.0, 2.0) == (COND_FRAME, UNCOND_FRAME, COND_VIDEO)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(("guidance", "temporal"), WEIGHTS)
def test_a_straight_flow_is_integrated_exactly_to_the_guided_target(sampler, guidance, temporal):
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 3, 4, 4, 4, generator=g)
    targets = {br: torch.randn(2, 3, 4, 4, 4, generator=g) for br in (UNCOND_FRAME, COND_FRAME, COND_VIDEO)}
    seen = []

    def predict(x, t, branches):
        seen.append(tuple(branches))
        assert t.shape == (2,)
        return [eps - targets[br] for br in branches]  # each branch a straight flow to its own target

    out = sample_video(predict, eps.clone(), get_schedule(7, shift=3.0), guidance=guidance, temporal_guidance=temporal,
                       sampler=SAMPLERS[sampler])  # fmt: skip
    # Guidance is affine in the velocities, so the guided flow is the straight flow to the guided target.
    expected = eps - temporal_guidance_velocity(
        *(eps - targets[br] for br in (UNCOND_FRAME, COND_FRAME, COND_VIDEO)), guidance, temporal
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert all(s == needed_branches(guidance, temporal) for s in seen)


def test_sdedit_start_from_noised_input_latents():
    g = torch.Generator().manual_seed(1)
    x0, eps, init = (torch.randn(1, 2, 4, 4, 4, generator=g) for _ in range(3))
    schedule = video_schedule(10, strength=0.4)
    assert len(schedule) == 5 and schedule[-1] == 0.0 and schedule[0] == pytest.approx(0.4)
    starts = []

    def predict(x, t, branches):
        if not starts:
            starts.append(x.clone())
        return [eps - x0 for _ in branches]

    out = sample_video(predict, eps, schedule, guidance=1.0, temporal_guidance=1.0, init_latents=init)
    torch.testing.assert_close(starts[0], noised(init, eps, schedule[0]))
    # a straight flow from the start point moves it by schedule[0] * (x0 - eps)
    torch.testing.assert_close(out, starts[0] + schedule[0] * (x0 - eps), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="init_latents"):
        sample_video(predict, eps, schedule, guidance=1.0, temporal_guidance=1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        sample_video(predict, eps, schedule, guidance=1.0, temporal_guidance=1.0, init_latents=init[:, :1])
    with pytest.raises(ValueError, match=r"\(B, F, C, h, w\)"):
        sample_video(predict, eps[0], get_schedule(2), guidance=1.0, temporal_guidance=1.0)


def test_omega_t_zero_is_frame_wise_classifier_free_guidance():
    _, video = _models()
    cond, null = _content(2)
    predict = branch_predictor(video, cond, null, None, None)
    noise = initial_noise((2, 3, 4, 8, 8), seed=3)
    schedule = get_schedule(4)
    length = 5
    u_tok = torch.nn.functional.pad(null[0], (0, 0, 0, length - 3)).expand(2, -1, -1)
    u_mask = torch.nn.functional.pad(null[1], (0, length - 3)).expand(2, -1)
    tokens, mask, pooled = (
        torch.cat([cond[0], u_tok]),
        torch.cat([cond[1], u_mask]),
        torch.cat([cond[2], null[2].expand(2, -1)]),
    )

    def frame_cfg(x, t):  # every frame an image, cond and uncond in one batch as the image denoiser does
        v = video(torch.cat([x, x]), torch.cat([t, t]), tokens, pooled, mask, temporal=False)
        return cfg_velocity(*v.chunk(2), 4.0)

    with torch.no_grad():
        expected = sample_euler(frame_cfg, noise, schedule)
        got = sample_video(predict, noise, schedule, guidance=4.0, temporal_guidance=0.0)
        video_guided = sample_video(predict, noise, schedule, guidance=4.0, temporal_guidance=1.0)
    assert torch.equal(got, expected)
    assert (video_guided - got).abs().max() > 1e-4  # the temporal layers do something here


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_one_frame_without_temporal_guidance_is_the_image_sampler(sampler):
    image, video = _models()
    cond, null = _content(2, seed=4)
    noise = initial_noise((2, 1, 4, 8, 8), seed=5)
    schedule = get_schedule(5, shift=2.0)
    u_tok = torch.nn.functional.pad(null[0], (0, 0, 0, 2)).expand(2, -1, -1)
    u_mask = torch.nn.functional.pad(null[1], (0, 2)).expand(2, -1)
    tokens, mask, pooled = (
        torch.cat([cond[0], u_tok]),
        torch.cat([cond[1], u_mask]),
        torch.cat([cond[2], null[2].expand(2, -1)]),
    )

    def image_cfg(x, t):  # `kinema.pipelines.local.LocalDenoiser`'s loop: one batched evaluation for CFG
        v = image(torch.cat([x, x]), torch.cat([t, t]), tokens, pooled, mask)
        return cfg_velocity(*v.chunk(2), 3.0)

    with torch.no_grad():
        expected = SAMPLERS[sampler](image_cfg, noise[:, 0], schedule)
        got = sample_video(branch_predictor(video, cond, null, None, None), noise, schedule, guidance=3.0,
                           temporal_guidance=0.0, sampler=SAMPLERS[sampler])  # fmt: skip
    assert got.shape == (2, 1, 4, 8, 8)
    assert torch.equal(got[:, 0], expected)


def test_seeds_reproduce_bit_for_bit():
    _, video = _models()
    cond, null = _content(1)
    structure = torch.rand(1, 3, 1, 8, 8) * 2 - 1
    predict = branch_predictor(video, cond, null, structure, torch.tensor([0.3]))

    def run(seed):
        with torch.no_grad():
            return sample_video(predict, initial_noise((1, 3, 4, 8, 8), seed), get_schedule(3), guidance=2.0,
                                temporal_guidance=1.5)  # fmt: skip

    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))


def test_callback_reports_every_step():
    calls = []
    predict = lambda x, t, branches: [-x for _ in branches]
    sample_video(predict, torch.ones(1, 2, 1, 2, 2), get_schedule(4), guidance=2.0, temporal_guidance=1.0,
                 callback=lambda i, n, x: calls.append((i, n)))  # fmt: skip
    assert calls == [(i, 4) for i in range(4)]
