import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from meddiff.diffusion import GaussianDiffusion, make_noise_schedule
from meddiff.train import train_step
from privacy.engine import make_private
from tests.conftest import tiny_unet


def _setup(n=6, k=1, noise=0.0, clip=1e6, seed=0):
    torch.manual_seed(seed)
    model = tiny_unet(num_classes=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    reference = tiny_unet(num_classes=2)
    reference.load_state_dict(model.state_dict())
    x0 = torch.randn(n, 1, 16, 16)
    y = torch.arange(n) % 2
    loader = DataLoader(TensorDataset(x0, y), batch_size=n)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    private = make_private(model, opt, loader, noise_multiplier=noise, max_grad_norm=clip, noise_multiplicity=k)
    return private, reference, x0, y


@pytest.mark.parametrize("k", [1, 4])
def test_per_image_gradients_match_reference_before_clipping(k):
    private, reference, x0, y = _setup(k=k)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100))
    private.optimizer.zero_grad()
    losses = diffusion.training_losses(private.model, x0, y=y, noise_multiplicity=k, generator=torch.Generator().manual_seed(3))
    losses.mean().backward()
    private.optimizer.pre_step()  # collapse, clip (C huge), add no noise, scale by the expected batch
    # reference: sum over images of grad of each image's mean loss over its K draws, / expected batch size
    ref_losses = diffusion.training_losses(reference, x0, y=y, noise_multiplicity=k, generator=torch.Generator().manual_seed(3))
    ref_grads = torch.autograd.grad(ref_losses.sum(), list(reference.parameters()))
    expected = private.optimizer.expected_batch_size
    for p, g in zip(private.optimizer.params, ref_grads):
        torch.testing.assert_close(p.grad, g / expected, rtol=1e-5, atol=1e-7)
    assert private.stats.total == len(x0)


def test_every_clipped_per_image_gradient_norm_is_at_most_c():
    c = 1e-3
    private, _, x0, y = _setup(n=1, k=2, clip=c)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100))
    for i in range(3):  # one image per step: p.grad * expected batch size is that image's clipped gradient
        private.optimizer.zero_grad()
        diffusion.training_losses(private.model, x0, y=y, noise_multiplicity=2, generator=torch.Generator().manual_seed(i)).mean().backward()
        private.optimizer.pre_step()
        norm = torch.stack([p.grad.norm() for p in private.optimizer.params]).norm() * private.optimizer.expected_batch_size
        assert norm <= c * (1 + 1e-4)
    assert private.stats.clip_fraction == 1.0


def test_added_noise_has_std_sigma_c_over_b():
    sigma, c = 1.3, 0.5
    private, _, x0, y = _setup(n=6, noise=sigma, clip=c)
    private.optimizer.zero_grad()
    p0 = private.optimizer.params[0]
    for p in private.optimizer.params:
        p.grad_sample = torch.zeros(6, *p.shape)  # zero gradients: what remains is the noise
    private.optimizer.pre_step()
    noise = torch.cat([p.grad.flatten() for p in private.optimizer.params])
    expected = sigma * c / private.optimizer.expected_batch_size
    assert noise.numel() > 10_000
    assert abs(float(noise.std()) / expected - 1) < 0.03
    assert abs(float(noise.mean())) < 3 * expected / noise.numel() ** 0.5


def test_empty_poisson_batch_steps_and_advances_the_accountant():
    private, _, x0, y = _setup(n=6, noise=1.0, clip=1.0)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100))
    loss = train_step(private.model, diffusion, private.optimizer, x0[:0], y[:0])
    assert loss == 0.0
    sigma, q, steps = private.engine.accountant.history[-1]
    assert (sigma, steps) == (1.0, 1)  # the empty step is accounted for
    # and it still took a noisy step: every gradient is pure noise
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in private.optimizer.params)


def test_history_is_restored_and_weights_are_unwrapped():
    private, reference, _, _ = _setup()
    assert all(not k.startswith("_module.") for k in private.state_dict())
    assert set(private.state_dict()) == set(reference.state_dict())
    model = tiny_unet()
    loader = DataLoader(TensorDataset(torch.zeros(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)), batch_size=2)
    again = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, noise_multiplier=1.0, max_grad_norm=1.0,
                         accountant_history=[(1.0, 0.5, 10)])
    assert again.history == [(1.0, 0.5, 10)]
    assert again.engine.get_epsilon(1e-5) > 0
