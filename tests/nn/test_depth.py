import pytest
import torch

from kinema.nn.depth import (
    PRESETS,
    DepthNet,
    DepthParams,
    align_scale_shift,
    estimate,
    gradient_matching_loss,
    load_depth_net,
    normalise_disparity,
    ssi_loss,
    working_size,
)

TINY = PRESETS["tiny"]


@pytest.mark.parametrize("size", [(16, 16), (16, 32), (48, 24)])
def test_forward_shape_is_one_channel_at_input_size(size):
    model = DepthNet(TINY)
    assert model(torch.randn(2, 3, *size)).shape == (2, 1, *size)


def test_forward_rejects_sides_off_the_multiple():
    with pytest.raises(ValueError, match="multiples of 4"):
        DepthNet(TINY)(torch.randn(1, 3, 18, 16))


@pytest.mark.parametrize(("hw", "want"), [((64, 64), (16, 16)), ((500, 741), (16, 24)), ((3, 5), (16, 28)),
                                         ((1, 1), (16, 16))])  # fmt: skip
def test_estimate_runs_at_the_working_size_and_returns_the_input_size(hw, want):
    model = DepthNet(TINY)
    assert working_size(*hw, TINY) == want
    assert estimate(model, torch.randn(2, 3, *hw)).shape == (2, 1, *hw)


def test_params_reject_widths_off_the_groups():
    with pytest.raises(ValueError, match="groups"):
        DepthParams(block_out_channels=(8, 12), norm_num_groups=8)


def test_default_preset_ships_under_4_mb():
    n = sum(p.numel() for p in DepthNet(PRESETS["mini"]).parameters())
    assert n * 4 < 4e6


def test_alignment_recovers_scale_and_shift():
    target = torch.rand(3, 1, 8, 8)
    scale, shift = torch.tensor([2.0, 0.5, 7.0]), torch.tensor([-1.0, 3.0, 0.2])
    pred = (target - shift[:, None, None, None]) / scale[:, None, None, None]
    s, t = align_scale_shift(pred, target)
    torch.testing.assert_close(s, scale, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(t, shift, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mse", "l1"])
@pytest.mark.parametrize(("scale", "shift"), [(3.0, 0.0), (0.01, 5.0), (250.0, -40.0)])
def test_ssi_loss_is_invariant_to_scale_and_shift_of_the_prediction(kind, scale, shift):
    torch.manual_seed(0)
    target, pred = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    base, _ = ssi_loss(pred, target, kind=kind)
    moved, _ = ssi_loss(pred * scale + shift, target, kind=kind)
    assert base > 0.01
    torch.testing.assert_close(moved, base, rtol=1e-4, atol=1e-6)
    exact, aligned = ssi_loss(target * scale + shift, target, kind=kind)
    assert exact.item() < 1e-3 * base.item()
    torch.testing.assert_close(aligned, target, rtol=1e-4, atol=1e-4)


def test_ssi_loss_penalises_an_inverted_map():
    target = torch.rand(2, 1, 8, 8)
    assert ssi_loss(-target, target)[0] > 0.9  # aligned exactly, but nearer would read as farther


def test_ssi_loss_with_a_mask_ignores_masked_pixels():
    target, pred = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[..., :4, :] = True
    garbage = torch.where(mask, target, torch.full_like(target, 1e3))  # masked-out pixels far off
    torch.testing.assert_close(ssi_loss(pred, garbage, mask)[0], ssi_loss(pred, target, mask)[0])
    s, t = align_scale_shift(2 * target + 1, garbage, mask)
    torch.testing.assert_close(s, torch.full((2,), 0.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(t, torch.full((2,), -0.5), atol=1e-4, rtol=0)


def test_gradient_matching_ignores_a_constant_offset_and_sees_edges():
    target = torch.rand(2, 1, 16, 16)
    assert gradient_matching_loss(target + 3.0, target).item() < 1e-5
    bumped = target.clone()
    bumped[..., 4:8, 4:8] += 1.0
    assert gradient_matching_loss(bumped, target) > 0.1


def test_normalised_disparity_has_zero_median_and_unit_mad():
    d = normalise_disparity(torch.rand(3, 1, 9, 9) * 10 + 2)
    flat = d.flatten(1)
    torch.testing.assert_close(flat.median(1).values, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.abs().mean(1), torch.ones(3), atol=1e-4, rtol=0)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = DepthNet(TINY)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    # Depth that depends on the image: a ramp plus a bright square nearer the camera.
    target = torch.linspace(0, 1, 16).view(1, 1, 16, 1).expand(4, 1, 16, 16).clone()
    target[..., 5:10, 5:10] += x[:, :1, 5:10, 5:10].abs() + 0.5
    target = normalise_disparity(target)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = ssi_loss(model(x), target)[0]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_checkpoint_round_trip(tmp_path):
    from kinema.nn.checkpoint import save_checkpoint

    model = DepthNet(TINY).eval()
    save_checkpoint(tmp_path / "d.safetensors", model.state_dict(), model.params)
    loaded, sha = load_depth_net(tmp_path / "d.safetensors")
    assert loaded.params == TINY and len(sha) == 64
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
