"""The anatomy constraint: a frozen segmenter's Dice on the predicted x0 against the condition."""

import pytest
import torch
from torch import nn

from configs import ConfigError, load_config
from meddiff.diffusion import AnatomyConstraint, GaussianDiffusion, SpatialConditioning, make_noise_schedule, mask_to_condition
from meddiff.diffusion.gaussian import row_mse
from meddiff.evaluate.segmentation import Segmenter, SegmenterSettings, build_segmenter, save_segmenter
from meddiff.recipes.build import build_conditioned_diffusion
from tests.conftest import tiny_unet

SETTINGS = SegmenterSettings(out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def test_the_term_is_zero_for_noisy_rows_and_dropped_masks_and_small_when_the_segmenter_finds_the_mask():
    masks = torch.zeros(4, 2, 8, 8)
    masks[:, 0, 2:6, 2:6] = 1.0
    cond = mask_to_condition(masks)
    cond[3] = 0.0  # dropped: the null condition
    right = AnatomyConstraint(FixedLogits(cond * 50.0), weight=2.0, max_t=10)
    wrong = AnatomyConstraint(FixedLogits(-cond * 50.0), weight=2.0, max_t=10)
    t = torch.tensor([0, 5, 10, 0])
    x0_hat = torch.zeros(4, 1, 8, 8)
    found, missed = right.row_losses(x0_hat, cond, t), wrong.row_losses(x0_hat, cond, t)
    assert found[2] == 0 and missed[2] == 0  # t >= max_t
    assert found[3] == 0 and missed[3] == 0  # dropped mask
    assert float(found[:2].max()) < 0.05 and float(missed[:2].min()) > 0.9


def _objective(segmenter, *, weight=1.0):
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 50), prediction_type="v")
    anatomy = AnatomyConstraint(segmenter, weight=weight, max_t=50) if segmenter is not None else None
    return SpatialConditioning(diffusion, image_channels=1, anatomy=anatomy)


def test_the_gradient_flows_into_the_denoiser_and_not_into_the_frozen_segmenter():
    torch.manual_seed(0)
    segmenter = build_segmenter(SETTINGS)
    frozen_before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    model = tiny_unet(cond_channels=2)
    masks = (torch.rand(4, 2, 16, 16) > 0.7).float()
    x0 = torch.cat([torch.randn(4, 1, 16, 16).clamp(-1, 1), mask_to_condition(masks)], dim=1)

    def grads(objective):
        model.zero_grad()
        objective.training_losses(model, x0, generator=torch.Generator().manual_seed(1)).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain, constrained = grads(_objective(None)), grads(_objective(segmenter, weight=5.0))
    assert not torch.allclose(plain, constrained)
    assert all(p.grad is None and not p.requires_grad for p in segmenter.parameters())
    assert all(torch.equal(v, segmenter.state_dict()[k]) for k, v in frozen_before.items())


def test_the_loss_is_the_plain_loss_plus_the_term_row_by_row():
    torch.manual_seed(0)
    segmenter, model = build_segmenter(SETTINGS), tiny_unet(cond_channels=2)
    x0 = torch.cat([torch.randn(3, 1, 16, 16).clamp(-1, 1), mask_to_condition((torch.rand(3, 2, 16, 16) > 0.5).float())], 1)
    objective = _objective(segmenter)
    x_in, t, _, target = objective.training_inputs(x0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x_in, t)
        x0_hat, _ = objective.diffusion.split_model_output(out, x_in[:, :1], t)
        expected = row_mse(out, target) + objective.anatomy.row_losses(x0_hat, x_in[:, 1:], t)
        got = objective.training_losses(model, x0, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(got, expected)


def test_config_refuses_an_anatomy_constraint_without_masks_or_without_a_segmenter_and_a_misfit_segmenter(tmp_path):
    with pytest.raises(ConfigError, match="train.anatomy_weight.*model.cond_channels' is 0"):
        load_config(None, ["train.anatomy_weight=1"])
    with pytest.raises(ConfigError, match="needs 'train.anatomy_segmenter'"):
        load_config(None, ["model.cond_channels=4", "train.anatomy_weight=1"])
    path = save_segmenter(tmp_path / "seg.pt", Segmenter(build_segmenter(SETTINGS), SETTINGS, ("brain", "tumour")))
    cfg = load_config(None, ["model.cond_channels=4", "train.anatomy_weight=1", f"train.anatomy_segmenter={path}"])
    with pytest.raises(ValueError, match="train.anatomy_segmenter .* 2 mask channels.*model.cond_channels=4"):
        build_conditioned_diffusion(cfg)
    cfg = load_config(None, ["model.cond_channels=2", "train.anatomy_weight=1", f"train.anatomy_segmenter={tmp_path / 'no.pt'}"])
    with pytest.raises(ValueError, match="train.anatomy_segmenter: segmenter file not found"):
        build_conditioned_diffusion(cfg)
    ok = load_config(None, ["model.cond_channels=2", "train.anatomy_weight=1", f"train.anatomy_segmenter={path}"])
    assert build_conditioned_diffusion(ok).anatomy is not None
    assert build_conditioned_diffusion(ok, plain=True).anatomy is None  # the held-out loss stays comparable


@pytest.mark.slow
def test_meddiff_train_runs_with_an_anatomy_constraint_from_a_segmenter_file(tmp_path):
    """The whole path: a segmenter trained on real phantom pairs and saved as `meddiff evaluate
    --task segmentation` saves it, then a mask-conditioned training run constrained by it."""
    from meddiff.data.phantoms import make_phantoms
    from meddiff.evaluate.segmentation import train_segmenter
    from meddiff.recipes.centralized import train_centralized
    from tests.conftest import tiny_config

    images, _, masks = make_phantoms(32, 16, seed=0, lesion_fraction=1.0, masks=True)
    settings = SegmenterSettings(channels=(4, 8), strides=(2,), num_res_units=0, steps=5, batch_size=8)
    seg = train_segmenter(torch.from_numpy(images)[:, None] * 2 - 1, torch.from_numpy(masks).float(), settings=settings)
    path = save_segmenter(tmp_path / "segmenter_real.pt", seg)
    cfg = tiny_config(tmp_path, ["model.cond_channels=4", "data.num_samples=16", "output.num_samples=2", "train.steps=3",
                                 "train.anatomy_weight=0.5", f"train.anatomy_segmenter={path}", "train.anatomy_max_t=1000"])
    run = train_centralized(cfg, progress=False)
    assert (run / "checkpoints" / "last.pt").is_file()
