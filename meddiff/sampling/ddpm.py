"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2), over any subset of timesteps."""

from __future__ import annotations

from typing import Optional

import torch

from meddiff.sampling.base import Sampler


class DDPMSampler(Sampler):
    """Ancestral sampling from the posterior ``q(x_{t'} | x_t, x0)`` (Ho et al. 2020, eqs. 6-7).

    With the full schedule (``t' = t - 1``) and no clipping the update is exactly eq. 11:
    ``x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t) + sigma_t z`` with
    ``sigma_t^2 = beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t``. For strided
    schedules, ``beta_t`` is replaced by the effective ``1 - alpha_bar_t / alpha_bar_{t'}`` (Nichol &
    Dhariwal 2021, Sec. 4), which keeps the process a valid Markov chain over the visited steps.
    """

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One reverse step. Shapes: ``model_output, x_t: [N, C, *S]``; returns ``x_{t'}`` of that shape."""
        t = int(t)
        prev_t = self.prev_timestep(t)
        a_t, a_prev = self._alphas(t, prev_t)
        beta_t = 1.0 - a_t / a_prev
        x0, _ = self._pred_x0_eps(model_output, t, x_t, a_t)
        # Posterior mean, eq. 7: mu = sqrt(a_prev) beta / (1 - a_t) x0 + sqrt(1 - beta) (1 - a_prev) / (1 - a_t) x_t
        coef_x0 = a_prev**0.5 * beta_t / (1.0 - a_t)
        coef_xt = (1.0 - beta_t) ** 0.5 * (1.0 - a_prev) / (1.0 - a_t)
        mean = coef_x0 * x0 + coef_xt * x_t
        if prev_t < 0:  # last step: x0's posterior has zero variance
            return mean
        variance = max((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
        return mean + variance**0.5 * self._noise(x_t, generator, noise)
