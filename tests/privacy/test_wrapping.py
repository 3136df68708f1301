"""What Opacus's wrapping changes: weights that cross a boundary, EMA and objectives see the plain
model; and exact per-image gradients of the autoencoder under DP."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from configs import config_to_dict
from meddiff.checkpoint import load_checkpoint, save_checkpoint
from meddiff.ema import EMA
from meddiff.nets.autoencoder import AutoencoderObjective, kl_per_example
from privacy.per_sample import per_example_gradients
from privacy.wrapping import expose_attributes, unwrap, unwrap_state
from tests.conftest import tiny_config, tiny_unet
from tests.meddiff.nets.test_autoencoder import tiny_ae
from tests.meddiff.test_checkpoint import _trained_model


def test_ema_of_opacus_wrapped_model_has_plain_keys_and_copies_back():
    model = tiny_unet()
    wrapped = GradSampleModule(model)
    ema = EMA(unwrap(wrapped), decay=0.0, warmup=False)
    assert set(ema.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    ema.update(unwrap(wrapped))
    fresh = tiny_unet()
    ema.copy_to(fresh)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    wrapped._close()


def test_opacus_prefix_is_stripped(tmp_path):
    cfg = tiny_config()
    model = _trained_model(cfg)
    wrapped = GradSampleModule(model)
    assert any(k.startswith("_module.") for k in wrapped.state_dict())
    path = save_checkpoint(tmp_path / "c.pt", model_state=unwrap_state(wrapped.state_dict()), config=config_to_dict(cfg), step=1)
    assert not any(k.startswith("_module.") for k in load_checkpoint(path).model)
    assert set(unwrap_state(wrapped.state_dict())) == set(model.state_dict())
    wrapped._close()


def test_opacus_per_sample_gradients_of_the_autoencoder_equal_one_image_at_a_time_autograd():
    """Phase 1 under DP: Opacus hooks mode on MONAI's AutoencoderKL gives exact per-image gradients."""
    torch.manual_seed(0)
    ae = tiny_ae()
    assert ModuleValidator.validate(ae, strict=True) == []
    reference = tiny_ae()
    reference.load_state_dict(ae.state_dict())
    wrapped = expose_attributes(GradSampleModule(ae, loss_reduction="sum"), ae)
    objective = AutoencoderObjective(kl_weight=1e-2)
    x = torch.randn(4, 1, 16, 16)
    objective.training_losses(wrapped, x, generator=torch.Generator().manual_seed(3)).sum().backward()
    noise = torch.randn(ae.latent_shape(x.shape), generator=torch.Generator().manual_seed(3))
    for i in range(len(x)):
        recon, mu, sigma = reference(x[i:i + 1], noise[i:i + 1])
        loss = (recon - x[i:i + 1]).abs().mean() + 1e-2 * kl_per_example(mu, sigma).sum()
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        for (name, p), g in zip(ae.named_parameters(), grads):
            rel = float((p.grad_sample[i] - g).norm() / g.norm().clamp_min(1e-12))
            assert rel < 1e-4, (name, rel)


def test_book_keeping_per_example_gradients_of_the_autoencoder_are_exact():
    """Phase 1 under DP in the default (bk) mode: per-image gradients of the autoencoder's loss."""
    torch.manual_seed(0)
    ae = tiny_ae()
    objective = AutoencoderObjective(kl_weight=1e-2)
    x = torch.randn(4, 1, 16, 16)
    grads, losses = per_example_gradients(ae, lambda: objective.training_losses(ae, x, generator=torch.Generator().manual_seed(3)), 4)
    noise = torch.randn(ae.latent_shape(x.shape), generator=torch.Generator().manual_seed(3))
    for i in range(len(x)):
        recon, mu, sigma = ae(x[i:i + 1], noise[i:i + 1])
        loss = (recon - x[i:i + 1]).abs().mean() + 1e-2 * kl_per_example(mu, sigma).sum()
        assert float(loss) == pytest.approx(float(losses[i]), rel=1e-5)
        for (name, _), g in zip(ae.named_parameters(), torch.autograd.grad(loss, list(ae.parameters()))):
            assert float((grads[name][i] - g).norm() / g.norm().clamp_min(1e-12)) < 1e-4, name
