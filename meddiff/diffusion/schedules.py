"""Noise schedules: maps from step index to beta_t, computed in float64.

A registry (``NOISE_SCHEDULES``) whose keys are the config's allowed values of
``diffusion.noise_schedule``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def linear_beta_schedule(num_train_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linearly spaced betas (Ho et al. 2020, Sec. 4: 1e-4 to 0.02 over T = 1000).

    Returns:
        ``[T]`` float64 array.
    """
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)


def cosine_beta_schedule(num_train_timesteps: int, *, s: float = 0.008, max_beta: float = 0.999, **_) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    ``alpha_bar(t) = f(t) / f(0)`` with ``f(t) = cos(((t / T + s) / (1 + s)) * pi / 2) ** 2`` and
    ``beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta)``.

    Returns:
        ``[T]`` float64 array.
    """

    def f(t: float) -> float:
        return math.cos((t / num_train_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1.0 - f(i + 1) / f(i), max_beta) for i in range(num_train_timesteps)]
    return np.asarray(betas, dtype=np.float64)


NOISE_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
}


def make_noise_schedule(name: str, num_train_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Betas of the named schedule, ``[T]`` float64."""
    if name not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(NOISE_SCHEDULES)}")
    if name == "linear":
        return linear_beta_schedule(num_train_timesteps, beta_start=beta_start, beta_end=beta_end)
    return NOISE_SCHEDULES[name](num_train_timesteps)
