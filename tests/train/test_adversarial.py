"""PatchGAN discriminator and hinge losses (taming / LDM) used by `--adversarial-weight`."""

import torch

from kinema.nn.autoencoder import Autoencoder, AutoencoderParams
from kinema.train.adversarial import PatchDiscriminator, discriminator_hinge_loss, generator_loss
from kinema.train.autoencoder import _adversarial_generator_term, _discriminator_step


def test_discriminator_gives_one_logit_per_patch():
    d = PatchDiscriminator(channels=16)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    assert d(torch.randn(1, 3, 64, 64)).shape == (1, 1, 14, 14)


def test_hinge_losses():
    # Confident and right: no discriminator loss; a margin violated by 1 on each side costs 1.
    assert discriminator_hinge_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert discriminator_hinge_loss(torch.zeros(4), torch.zeros(4)) == 1
    assert generator_loss(torch.tensor([1.0, 3.0])) == -2.0


def test_a_discriminator_step_separates_real_from_fake_and_the_generator_term_is_balanced():
    torch.manual_seed(0)
    d = PatchDiscriminator(channels=16)
    opt = torch.optim.AdamW(d.parameters(), lr=2e-3, betas=(0.5, 0.9))
    real, fake = torch.rand(4, 3, 32, 32) * 2 - 1, torch.zeros(4, 3, 32, 32)
    losses = [_discriminator_step(d, opt, real, fake) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]

    ae = Autoencoder(AutoencoderParams(block_out_channels=(8, 8), norm_num_groups=4))
    rec = ae.decode_raw(ae.posterior(real).mean)
    rec_loss = (rec - real).abs().mean()
    term = _adversarial_generator_term(ae, d, rec, rec_loss, weight=0.5)
    last = ae.decoder.conv_out.weight
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0].norm()
    g_adv = torch.autograd.grad(term, last, retain_graph=True)[0].norm()
    # Adaptive weight (taming eq. 7): the adversarial gradient at the last layer is `weight` x the reconstruction's.
    torch.testing.assert_close(g_adv, 0.5 * g_rec, rtol=1e-3, atol=1e-6)
    d.zero_grad(set_to_none=True)
    term.backward()
    assert all(p.grad is None and p.requires_grad for p in d.parameters())  # the generator term leaves D untouched
