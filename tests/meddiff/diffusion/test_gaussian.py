import pytest
import torch

from meddiff.diffusion import GaussianDiffusion, collapse_noise_multiplicity, make_noise_schedule


@pytest.fixture
def diffusion():
    return GaussianDiffusion(make_noise_schedule("cosine", 1000), prediction_type="eps")


def test_q_sample_golden(diffusion):
    x0 = torch.full((1, 1, 2, 2), 0.5)
    noise = torch.full((1, 1, 2, 2), -1.0)
    x_t = diffusion.q_sample(x0, torch.tensor([499]), noise)
    a = 0.4938435904406382
    assert torch.allclose(x_t, torch.full_like(x_t, a**0.5 * 0.5 - (1 - a) ** 0.5), atol=1e-7)


def test_parameterisation_round_trips(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    v = diffusion.v_from_x0_eps(x0, t, eps)
    # x0 from eps divides by sqrt(alpha_bar_t), ill-conditioned at t = T-1 in float32: check t < T-1
    torch.testing.assert_close(diffusion.x0_from_eps(x_t[:3], t[:3], eps[:3]), x0[:3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(diffusion.eps_from_x0(x_t[1:], t[1:], x0[1:]), eps[1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(diffusion.x0_from_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diffusion.eps_from_v(x_t, t, v), eps, atol=1e-5, rtol=1e-5)
    # v golden: v = sqrt(a) eps - sqrt(1 - a) x0
    a = diffusion.alphas_cumprod[500].item()
    torch.testing.assert_close(v[2], a**0.5 * eps[2] - (1 - a) ** 0.5 * x0[2])


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_split_and_inverse(prediction_type):
    d = GaussianDiffusion(make_noise_schedule("linear", 1000), prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([20, 400, 800])
    x_t = d.q_sample(x0, t, eps)
    target = d.training_target(x0, t, eps)
    pred_x0, pred_eps = d.split_model_output(target, x_t, t)
    torch.testing.assert_close(pred_x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred_eps, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.model_output_from_eps(eps, x_t, t), target, atol=1e-4, rtol=1e-4)


def test_per_example_loss_shape_and_value(diffusion):
    x0 = torch.zeros(5, 1, 4, 4)

    def zero_model(x_t, t, y=None):
        return torch.zeros_like(x_t)

    g = torch.Generator().manual_seed(0)
    loss = diffusion.training_losses(zero_model, x0, noise_multiplicity=3, generator=g)
    assert loss.shape == (5,)
    # zero prediction of eps: the loss is the mean squared noise of each example's 3 draws
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 1000, (15,), generator=g)
    noise = torch.randn(15, 1, 4, 4, generator=g)
    torch.testing.assert_close(loss, noise.pow(2).flatten(1).mean(1).view(5, 3).mean(1))


def test_training_losses_expand_with_repeat_interleave(diffusion):
    seen = {}

    def spy(x_t, t, y=None):
        seen["y"] = y
        seen["n"] = x_t.shape[0]
        return torch.zeros_like(x_t)

    diffusion.training_losses(spy, torch.zeros(2, 1, 4, 4), y=torch.tensor([0, 1]), noise_multiplicity=3)
    assert seen["n"] == 6
    assert seen["y"].tolist() == [0, 0, 0, 1, 1, 1]


def test_empty_batch_loss(diffusion):
    loss = diffusion.training_losses(lambda x, t: torch.zeros_like(x), torch.zeros(0, 1, 4, 4), noise_multiplicity=2)
    assert loss.shape == (0,)


def test_collapse_noise_multiplicity():
    rows = torch.arange(12.0).view(6, 2)
    out = collapse_noise_multiplicity(rows, 3)
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    with pytest.raises(ValueError, match="not a multiple"):
        collapse_noise_multiplicity(torch.zeros(5, 2), 3)


def test_bad_schedule_and_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianDiffusion(make_noise_schedule("linear", 10), prediction_type="score")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion([0.1, 1.5])
