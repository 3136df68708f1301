"""The UNet is built from layers Opacus supports natively, with exact per-sample gradients."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from configs import load_config
from meddiff.recipes.build import build_unet_from_section
from meddiff.diffusion import GaussianDiffusion, collapse_noise_multiplicity, make_noise_schedule
from tests.conftest import tiny_unet


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_module_validator_is_clean_on_default_and_3d_models():
    cfg = load_config()
    assert ModuleValidator.validate(build_unet_from_section(cfg.model, cfg.data.image_size), strict=False) == []
    assert ModuleValidator.validate(tiny_unet(spatial_dims=3, num_classes=3), strict=False) == []
    ModuleValidator.validate(tiny_unet(num_classes=2), strict=True)  # raises on any problem


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_per_sample_gradients_match_per_example_autograd(spatial_dims):
    torch.manual_seed(0)
    model = _randomise(tiny_unet(spatial_dims=spatial_dims, num_classes=2))
    size = 8 if spatial_dims == 3 else 16
    x = torch.randn(3, 1, *([size] * spatial_dims))
    t = torch.tensor([5, 400, 990])
    y = torch.tensor([0, 1, 2])

    reference = []
    for i in range(3):
        model.zero_grad()
        model(x[i : i + 1], t[i : i + 1], y[i : i + 1]).pow(2).sum().backward()
        reference.append({n: p.grad.clone() for n, p in model.named_parameters()})

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True, force_functorch=False)
    gsm.zero_grad()
    gsm(x, t, y).pow(2).sum().backward()
    for name, p in model.named_parameters():
        for i in range(3):
            ref = reference[i][name]
            assert torch.allclose(p.grad_sample[i], ref, atol=1e-5, rtol=1e-4), f"{name} sample {i}"
    gsm._close()


def test_noise_multiplicity_collapse_equals_autograd_of_mean_over_k_draws():
    """Each example's collapsed gradient = grad of that example's mean loss over its K draws."""
    torch.manual_seed(0)
    model = _randomise(tiny_unet(num_classes=2))
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 100))
    n, k = 3, 4
    x0 = torch.randn(n, 1, 16, 16)
    y = torch.tensor([0, 1, 1])

    reference = []
    for i in range(n):
        g = torch.Generator().manual_seed(7)
        # draw the same (t, noise) as the batched call: replay the generator for the whole batch
        model.zero_grad()
        losses = diffusion.training_losses(model, x0, y=y, noise_multiplicity=k, generator=g)
        losses[i].backward()
        reference.append({name: p.grad.clone() for name, p in model.named_parameters()})

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    gsm.zero_grad()
    g = torch.Generator().manual_seed(7)
    losses = diffusion.training_losses(gsm, x0, y=y, noise_multiplicity=k, generator=g)
    assert losses.shape == (n,)
    losses.mean().backward()  # mean over N examples == mean over N*K rows
    for name, p in model.named_parameters():
        assert p.grad_sample.shape[0] == n * k
        collapsed = collapse_noise_multiplicity(p.grad_sample, k)
        assert collapsed.shape[0] == n
        for i in range(n):
            assert torch.allclose(collapsed[i], reference[i][name], atol=1e-6, rtol=1e-4), f"{name} example {i}"
    gsm._close()
