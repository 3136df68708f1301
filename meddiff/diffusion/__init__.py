"""Noise schedules and the Gaussian diffusion process."""

from meddiff.diffusion.gaussian import GaussianDiffusion, collapse_noise_multiplicity
from meddiff.diffusion.schedules import NOISE_SCHEDULES, make_noise_schedule

__all__ = ["GaussianDiffusion", "collapse_noise_multiplicity", "NOISE_SCHEDULES", "make_noise_schedule"]
