import pytest
import torch
from torch.utils.data import DataLoader

from meddiff.recipes.build import build_diffusion, build_unet_from_section
from meddiff.data import PhantomDataset
from meddiff.diffusion import GaussianDiffusion, make_noise_schedule
from meddiff.train import cycle, drop_labels, train_loop, train_step
from tests.conftest import tiny_config, tiny_unet


def _eval_loss(model, diffusion, x0, y=None, seed=123):
    """Loss on fixed (t, noise) draws, so before/after are comparable."""
    model.eval()
    with torch.no_grad():
        loss = diffusion.training_losses(model, x0, y=y, noise_multiplicity=8, generator=torch.Generator().manual_seed(seed)).mean()
    model.train()
    return float(loss)


@pytest.mark.slow
def test_overfit_eight_phantoms_lowers_loss_fivefold():
    torch.manual_seed(0)
    ds = PhantomDataset(8, 16, seed=0)
    model = tiny_unet(num_classes=2, model_channels=16, channel_mult=(1, 2), attention_levels=(1,), num_head_channels=16)
    diffusion = GaussianDiffusion(make_noise_schedule("cosine", 1000), prediction_type="x0")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    before = _eval_loss(model, diffusion, ds.images, ds.labels)
    loader = DataLoader(ds, batch_size=8, shuffle=True)
    result = train_loop(model=model, objective=diffusion, optimizer=opt, batches=cycle(loader), steps=300,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(0), progress=False)
    after = _eval_loss(model, diffusion, ds.images, ds.labels)
    assert result.steps == 300 and result.examples == 2400
    assert after * 5 <= before, f"loss fell only from {before:.4f} to {after:.4f}"


def test_empty_batch_still_steps():
    model = tiny_unet()
    diffusion = GaussianDiffusion(make_noise_schedule("linear", 100))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = train_step(model, diffusion, opt, torch.zeros(0, 1, 16, 16))
    assert loss == 0.0


def test_train_step_changes_weights_and_grad_clip():
    torch.manual_seed(0)
    model = tiny_unet()
    diffusion = GaussianDiffusion(make_noise_schedule("linear", 100))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, diffusion, opt, torch.randn(4, 1, 16, 16), noise_multiplicity=2, grad_clip=1e-3)
    moved = sum(float((p.detach() - b).norm() ** 2) for p, b in zip(model.parameters(), before)) ** 0.5
    assert 0 < moved <= 0.1 * 1e-3 + 1e-7  # SGD step of a clipped gradient: lr * C


def test_drop_labels():
    y = torch.zeros(10_000, dtype=torch.long)
    dropped = drop_labels(y, p=0.25, null_label=2, generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 2}
    assert abs((dropped == 2).float().mean().item() - 0.25) < 0.02
    assert torch.equal(drop_labels(y, p=0.0, null_label=2), y)


def test_cycle_raises_on_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        next(cycle([]))


def test_builders_follow_config():
    cfg = tiny_config(extra=["model.num_classes=2", "diffusion.prediction_type=v"])
    model = build_unet_from_section(cfg.model, cfg.data.image_size)
    assert model.num_classes == 2 and model.label_embed is not None
    assert build_diffusion(cfg.diffusion).prediction_type == "v"
