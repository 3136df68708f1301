"""Noise schedules and the Gaussian diffusion process."""

from meddiff.diffusion.anatomy import AnatomyConstraint
from meddiff.diffusion.gaussian import GaussianDiffusion, collapse_noise_multiplicity, row_mse
from meddiff.diffusion.conditioning import SpatialConditioning, condition_on_grid, mask_to_condition
from meddiff.diffusion.regression import DirectRegression
from meddiff.diffusion.schedules import NOISE_SCHEDULES, make_noise_schedule

__all__ = ["AnatomyConstraint", "DirectRegression", "GaussianDiffusion", "collapse_noise_multiplicity", "row_mse", "SpatialConditioning", "condition_on_grid", "mask_to_condition", "NOISE_SCHEDULES", "make_noise_schedule"]
