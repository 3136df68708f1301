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


def _lesion_objective(w, dilation=0):
    return SpatialConditioning(GaussianDiffusion(make_noise_schedule("cosine", 100)), image_channels=1, cond_dropout=0.0,
                               lesion_weight=w, lesion_dilation=dilation)


def _lesion_masks():
    masks = torch.zeros(4, 2, 16, 16)
    masks[:, 0, 2:14, 2:14] = 1  # brain
    masks[:, 1, 6:9, 6:9] = 1  # lesion
    return masks


class _Shift(torch.nn.Module):
    """A dummy denoiser: the image channel of its input plus a fixed perturbation."""

    def __init__(self, delta):
        super().__init__()
        self.delta = delta

    def forward(self, x, t):
        return x[:, :1] + self.delta


def _loss(objective, delta, x0):
    return objective.training_losses(_Shift(delta), x0, noise_multiplicity=2, generator=torch.Generator().manual_seed(4))


def test_lesion_weight_changes_the_loss_only_inside_the_dilated_mask():
    x0, zero = _packed(_lesion_masks()), torch.zeros(1, 1, 16, 16)
    outside, ring = zero.clone(), zero.clone()
    outside[..., 0, 0] = 0.5  # far from the lesion (rows and columns 6..8)
    ring[..., 5, 5] = 0.5  # in the lesion dilated by 1, not in the lesion itself

    def change(w, dilation, delta):
        objective = _lesion_objective(w, dilation)
        return _loss(objective, delta, x0) - _loss(objective, zero, x0)

    assert float(change(1.0, 1, outside).abs().min()) > 0
    torch.testing.assert_close(change(5.0, 1, outside), change(1.0, 1, outside), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(change(5.0, 1, ring), 5.0 * change(1.0, 1, ring), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(change(5.0, 0, ring), change(1.0, 0, ring), rtol=1e-5, atol=1e-7)  # undilated


def test_lesion_weight_one_reproduces_the_plain_loss_bit_for_bit():
    model, x0 = _model(), _packed(_lesion_masks())
    for p in (0.0, 0.5):
        plain = _objective(p).training_losses(model, x0, noise_multiplicity=2, generator=torch.Generator().manual_seed(3))
        weighted = SpatialConditioning(GaussianDiffusion(make_noise_schedule("cosine", 100)), image_channels=1, cond_dropout=p,
                                       lesion_weight=1.0, lesion_dilation=3).training_losses(
            model, x0, noise_multiplicity=2, generator=torch.Generator().manual_seed(3))
        assert torch.equal(plain, weighted)


def test_a_dropped_condition_is_weighted_one_everywhere():
    from meddiff.diffusion.conditioning import lesion_weight_map

    cond = mask_to_condition(_lesion_masks())
    cond[1] = 0  # the null condition
    w = lesion_weight_map(cond, weight=5.0, dilation=1)
    assert w.shape == (4, 1, 16, 16) and torch.equal(w[1], torch.ones(1, 16, 16))
    assert int((w[0] == 5.0).sum()) == 25 and set(torch.unique(w[0]).tolist()) == {1.0, 5.0}  # 3x3 grown to 5x5
    w3 = lesion_weight_map(torch.zeros(2, 4, 6, 6, 6).sub(1).index_fill(1, torch.tensor([2]), 1.0), weight=2.0)
    assert w3.shape == (2, 1, 6, 6, 6) and torch.equal(w3, torch.full_like(w3, 2.0))  # 3-D, oedema channel


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_condition_on_the_latent_grid_is_its_area_average_in_2d_and_3d(spatial_dims):
    """A 16-side mask pooled to the 4-side latent grid of an f = 4 autoencoder: each cell holds
    2 * (the fraction of its pixels in the region) - 1, the null condition stays null, and the latent
    lesion weights are the area averages of the pixel ones."""
    import torch.nn.functional as F

    from meddiff.diffusion import condition_on_grid
    from meddiff.diffusion.conditioning import lesion_weight_map

    torch.manual_seed(0)
    side = (16,) * spatial_dims
    masks = torch.zeros(3, 3, *side)
    masks[:, 0] = 1.0  # brain everywhere
    masks[(slice(None), 1) + (slice(0, 3),) * spatial_dims] = 1.0  # a 3-pixel core: 9/16 (27/64) of one cell
    masks[(slice(None), 2) + (slice(4, 12),) * spatial_dims] = 1.0  # a region of whole cells, disjoint from the core
    cond = mask_to_condition(masks)
    cond[2] = 0.0  # a dropped (null) condition
    grid = condition_on_grid(cond, (4,) * spatial_dims)
    assert grid.shape == (3, 3) + (4,) * spatial_dims
    corner = (0, 1) + (0,) * spatial_dims
    assert float(grid[corner]) == pytest.approx(2 * (3 / 4) ** spatial_dims - 1)  # partial, not dropped or kept whole
    assert torch.equal(grid[:2, 0], torch.ones_like(grid[:2, 0])) and torch.equal(grid[2], torch.zeros_like(grid[2]))
    assert set(torch.unique(grid[:2, 2]).tolist()) == {-1.0, 1.0}  # whole cells stay binary
    assert condition_on_grid(cond, side) is cond  # pixel space: unchanged
    pool = F.avg_pool2d if spatial_dims == 2 else F.avg_pool3d
    pixel, latent = lesion_weight_map(cond, weight=5.0), lesion_weight_map(grid, weight=5.0)
    torch.testing.assert_close(latent, pool(pixel, 4))  # a cell's weight is the mean of its pixels' weights
    assert torch.equal(latent[2], torch.ones_like(latent[2]))  # the null condition weighs 1 everywhere
    with pytest.raises(ValueError, match="cannot be pooled"):
        condition_on_grid(cond, (4, 4, 4, 4)[:5 - spatial_dims])
