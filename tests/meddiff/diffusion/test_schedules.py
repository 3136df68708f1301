import math

import numpy as np
import pytest

from meddiff.diffusion import make_noise_schedule


def test_linear_golden_numbers():
    betas = make_noise_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=0)
    assert betas[-1] == pytest.approx(0.02, abs=0)
    assert betas[499] == pytest.approx(0.010040040040040039, rel=1e-15)
    alpha_bar = np.cumprod(1 - betas)
    # Ho et al. 2020: signal left at t = T is sqrt(alpha_bar_T) ~ 0.00635
    assert alpha_bar[-1] == pytest.approx(4.035829765375676e-05, rel=1e-12)
    assert alpha_bar[499] == pytest.approx(0.07858724288177824, rel=1e-12)


def test_cosine_matches_closed_form_alpha_bar():
    t_max, s = 1000, 0.008

    def f(t):
        return math.cos((t / t_max + s) / (1 + s) * math.pi / 2) ** 2

    betas = make_noise_schedule("cosine", t_max)
    alpha_bar = np.cumprod(1 - betas)
    for t in (0, 10, 499, 900):
        assert alpha_bar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-12)
    assert alpha_bar[499] == pytest.approx(0.4938435904406382, rel=1e-12)
    assert betas[-1] == pytest.approx(0.999)  # clipped at max_beta
    assert np.all(np.diff(betas[:-1]) > 0)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule 'sigmoid'"):
        make_noise_schedule("sigmoid", 10)
