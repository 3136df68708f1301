"""The translation baseline's L1 objective under DP-SGD: one exact gradient per example in every
per-example gradient engine (the diffusion translation objective is SpatialConditioning, whose
exactness tests/privacy/test_engine.py covers)."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from meddiff.diffusion import DirectRegression
from privacy.engine import make_private
from tests.conftest import twin_unets
from tests.privacy.test_engine import _per_image


@pytest.mark.parametrize("mode", ["hooks", "vmap", "bk"])
def test_regression_per_example_gradients_equal_one_example_at_a_time_autograd(mode):
    torch.manual_seed(0)
    model, reference = twin_unets(cond_channels=1)
    n = 5
    x0 = torch.randn(n, 2, 16, 16).clamp(-1, 1)  # packed (target, source)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                           DataLoader(TensorDataset(x0, torch.zeros(n, dtype=torch.long)), batch_size=n),
                           noise_multiplier=0.0, max_grad_norm=1e6, noise_multiplicity=1, grad_sample_mode=mode)
    objective = DirectRegression(image_channels=1)
    expected = []
    for i in range(n):
        loss = objective.training_losses(reference, x0[i:i + 1]).sum()
        expected.append(torch.autograd.grad(loss, list(reference.parameters())))
    expected = [torch.stack(g) for g in zip(*expected)]
    got = _per_image(private, mode, objective, x0, None, 1, torch.Generator().manual_seed(0))
    for g, e in zip(got, expected):
        assert g.shape[0] == n
        rel = float((g - e).norm() / e.norm().clamp_min(1e-12))
        assert rel <= 1e-5, rel
