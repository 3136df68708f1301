"""Reverse-process samplers (one algorithm per file), guidance and the sampling loop."""

from meddiff.sampling.base import Sampler, inference_timesteps
from meddiff.sampling.ddim import DDIMSampler
from meddiff.sampling.ddpm import DDPMSampler
from meddiff.sampling.generate import generate
from meddiff.sampling.guidance import ClassifierGuidance, classifier_free_output

SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}

__all__ = [
    "SAMPLERS",
    "Sampler",
    "DDPMSampler",
    "DDIMSampler",
    "ClassifierGuidance",
    "classifier_free_output",
    "generate",
    "inference_timesteps",
]
