import copy

import torch

from kinema.nn.mmdit import MMDiT, MMDiTParams
from kinema.train.flow import flow_loss
from kinema.train.state import ema_update, load_train_state, save_train_state

TINY = MMDiTParams(depth=1, hidden_size=32, num_heads=2, context_dim=8, pooled_dim=8, sample_size=8,
                   pos_embed_max_size=8)  # fmt: skip


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    cond = (torch.randn(4, 3, 8, generator=g), torch.ones(4, 3, dtype=torch.bool), torch.randn(4, 8, generator=g))
    return x0, torch.rand(4, generator=g), cond, torch.randn(4, 4, 8, 8, generator=g)


def _step(model, opt, ema, seed: int) -> None:
    x0, t, cond, noise = _batch(seed)
    loss = flow_loss(model, x0, t, cond, noise)
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema_update(ema, model, 0.9)


def test_resumed_training_continues_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = MMDiT(TINY)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for s in range(3):
        _step(model, opt, ema, s)
    save_train_state(tmp_path / "state.safetensors", model, opt, {"step": 3}, ema)
    for s in range(3, 5):  # uninterrupted
        _step(model, opt, ema, s)

    torch.manual_seed(1)  # a different init, overwritten by the checkpoint
    model2 = MMDiT(TINY)
    ema2 = copy.deepcopy(model2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert load_train_state(tmp_path / "state.safetensors", model2, opt2, ema2) == {"step": 3}
    for s in range(3, 5):
        _step(model2, opt2, ema2, s)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_flow_loss_is_zero_for_the_true_velocity() -> None:
    class Oracle(torch.nn.Module):
        def forward(self, xt, t, tokens, pooled, mask):
            return self.v

    x0, t, cond, noise = _batch(0)
    oracle = Oracle()
    oracle.v = noise - x0
    assert flow_loss(oracle, x0, t, cond, noise).item() == 0.0
    oracle.v = torch.zeros_like(x0)
    assert flow_loss(oracle, x0, t, cond, noise).item() > 0.5
