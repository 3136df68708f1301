"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12)."""

from __future__ import annotations

from typing import Optional

import torch

from meddiff.sampling.base import Sampler


class DDIMSampler(Sampler):
    """Generalised (non-Markovian) reverse step with stochasticity ``eta``.

    ``x_{t'} = sqrt(a_{t'}) x0 + sqrt(1 - a_{t'} - sigma^2) eps + sigma z`` (eq. 12), with
    ``sigma = eta * sqrt((1 - a_{t'}) / (1 - a_t)) * sqrt(1 - a_t / a_{t'})`` (eq. 16); ``eta = 0``
    is deterministic and ``eta = 1`` matches DDPM's posterior variance.
    """

    def __init__(self, diffusion, *, eta: float = 0.0, clip_denoised: bool = True, timestep_spacing: str = "leading"):
        super().__init__(diffusion, clip_denoised=clip_denoised, timestep_spacing=timestep_spacing)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)

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
        x0, eps = self._pred_x0_eps(model_output, t, x_t, a_t)
        sigma = self.eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)) ** 0.5
        x_prev = a_prev**0.5 * x0 + max(1.0 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x_prev = x_prev + sigma * self._noise(x_t, generator, noise)
        return x_prev
