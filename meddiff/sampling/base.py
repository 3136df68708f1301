"""Shared timestep bookkeeping for the reverse-process samplers (DDPM, DDIM)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from meddiff.diffusion.gaussian import GaussianDiffusion

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading") -> np.ndarray:
    """Descending timesteps visited by a sampler (spacings as in Lin et al. 2024, Table 2).

    - ``leading``: ``0, r, 2r, ...`` with ``r = T // n`` (DDIM's original choice);
    - ``trailing``: ``T-1, T-1-T/n, ...`` (always starts at the noisiest step);
    - ``linspace``: ``n`` rounded points of ``linspace(0, T-1)``.
    """
    t_max, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= t_max:
        raise ValueError(f"num_inference_steps must be in 1..{t_max}, got {n}")
    if spacing == "leading":
        steps = np.arange(0, n) * (t_max // n)
    elif spacing == "trailing":
        steps = np.round(np.arange(t_max, 0, -t_max / n)).astype(np.int64)[::-1] - 1
    elif spacing == "linspace":
        steps = np.round(np.linspace(0, t_max - 1, n)).astype(np.int64)
    else:
        raise ValueError(f"timestep spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    return np.ascontiguousarray(steps[::-1]).astype(np.int64)


class Sampler:
    """Base class: holds the process, the visited timesteps and each step's predecessor.

    Subclasses implement ``step(model_output, t, x_t, generator=None, noise=None) -> x_prev``.
    """

    def __init__(self, diffusion: GaussianDiffusion, *, clip_denoised: bool = True, timestep_spacing: str = "leading"):
        self.diffusion = diffusion
        self.clip_denoised = clip_denoised
        self.timestep_spacing = timestep_spacing
        self.timesteps: np.ndarray = np.arange(diffusion.num_train_timesteps)[::-1].copy()
        self._prev: dict[int, int] = {}
        self.set_timesteps(diffusion.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = inference_timesteps(self.diffusion.num_train_timesteps, num_inference_steps, self.timestep_spacing)
        nxt = list(self.timesteps[1:]) + [-1]
        self._prev = {int(t): int(p) for t, p in zip(self.timesteps, nxt)}

    def prev_timestep(self, t: int) -> int:
        """The timestep after ``t`` in this sampler's schedule (-1 after the last)."""
        try:
            return self._prev[int(t)]
        except KeyError:
            raise ValueError(f"timestep {int(t)} is not in this sampler's schedule; call set_timesteps first") from None

    def _alphas(self, t: int, prev_t: int) -> tuple[float, float]:
        ac = self.diffusion.alphas_cumprod
        return float(ac[t]), (float(ac[prev_t]) if prev_t >= 0 else 1.0)

    def _pred_x0_eps(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor, a_t: float):
        x0, eps = self.diffusion.split_model_output(model_output, x_t, torch.tensor(t))
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            # Re-derive eps from the clipped x0 so both predictions stay consistent (ADM, guided-diffusion).
            eps = (x_t - a_t**0.5 * x0) / (1.0 - a_t) ** 0.5
        return x0, eps

    @staticmethod
    def _noise(like: torch.Tensor, generator: Optional[torch.Generator], noise: Optional[torch.Tensor]) -> torch.Tensor:
        if noise is not None:
            return noise
        dev = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)

    def step(self, model_output, t, x_t, generator=None, noise=None):  # pragma: no cover - abstract
        raise NotImplementedError
