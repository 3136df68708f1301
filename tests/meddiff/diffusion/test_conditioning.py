"""The spatially conditioned denoising loss: packed (image, mask) examples, the null condition."""

import pytest
import torch

from meddiff.diffusion import GaussianDiffusion, SpatialConditioning, make_noise_schedule, mask_to_condition
from tests.conftest import tiny_unet


def _objective(p):
    return SpatialConditioning(GaussianDiffusion(make_noise_schedule("cosine", 100)), image_channels=1, cond_dropout=p)


def _model():
    torch.manual_seed(0)
    model = tiny_unet(cond_channels=2)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def _packed(mask):
    torch.manual_seed(1)
    return torch.cat([torch.randn(4, 1, 16, 16), mask_to_condition(mask)], dim=1)


def _loss_and_grads(model, objective, x0):
    losses = objective.training_losses(model, x0, noise_multiplicity=2, generator=torch.Generator().manual_seed(3))
    return losses.detach(), torch.autograd.grad(losses.sum(), list(model.parameters()))


def test_only_the_image_is_noised_and_regressed():
    x0 = _packed(torch.ones(4, 2, 16, 16))
    x_in, t, y_rows, target = _objective(0.0).training_inputs(x0, noise_multiplicity=3, generator=torch.Generator().manual_seed(0))
    assert x_in.shape == (12, 3, 16, 16) and target.shape == (12, 1, 16, 16) and t.shape == (12,) and y_rows is None
    assert torch.equal(x_in[:, 1:], torch.ones(12, 2, 16, 16))  # the condition, repeated per row, not noised
    plain = GaussianDiffusion(make_noise_schedule("cosine", 100)).training_inputs(
        x0[:, :1], noise_multiplicity=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_in[:, :1], plain[0])  # the same (t, eps) draws as the unconditioned loss


def test_with_cond_dropout_one_the_model_ignores_the_mask():
    model, objective = _model(), _objective(1.0)
    masks = torch.zeros(4, 2, 16, 16), torch.ones(4, 2, 16, 16)
    masks[0][:, 0, 4:9, 4:9] = 1
    (la, ga), (lb, gb) = (_loss_and_grads(model, objective, _packed(m)) for m in masks)
    assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb))
    # the same masks with the condition kept give different losses: the mask is an input that matters
    (ka, _), (kb, _) = (_loss_and_grads(model, _objective(0.0), _packed(m)) for m in masks)
    assert not torch.allclose(ka, kb)


def test_cond_dropout_drops_whole_examples_reproducibly():
    x0 = _packed(torch.ones(4, 2, 16, 16)).repeat(8, 1, 1, 1)  # 32 examples
    objective = _objective(0.5)
    x_in, *_ = objective.training_inputs(x0, noise_multiplicity=2, generator=torch.Generator().manual_seed(7))
    cond = x_in[:, 1:].reshape(32, 2, -1)  # [example, its K=2 rows, condition values]
    assert set(torch.unique(cond).tolist()) <= {0.0, 1.0}
    kept = cond.all(dim=2)
    assert torch.equal(kept, cond.any(dim=2))  # each row all-null or all-real
    assert torch.equal(kept[:, 0], kept[:, 1]) and 4 <= int(kept[:, 0].sum()) <= 28  # one draw per example
    again, *_ = objective.training_inputs(x0, noise_multiplicity=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, x_in)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="cond_dropout"):
        _objective(1.5)
    with pytest.raises(ValueError, match="image \\+ condition"):
        _objective(0.0).training_losses(_model(), torch.randn(2, 1, 16, 16))
