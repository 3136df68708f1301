"""Samples of a trained model with the config's sampler (and, for latent diffusion, its decoder)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from configs import ExperimentConfig
from meddiff.device import autocast_dtype, autocast_factory
from meddiff.latent import LatentCodec
from meddiff.recipes.build import build_diffusion, build_sampler, sample_shape
from meddiff.diffusion import condition_on_grid, mask_to_condition
from meddiff.sampling import generate


def sample_images(model: nn.Module, cfg: ExperimentConfig, *, num: int, device: torch.device, seed: int = 0,
                  y: Optional[torch.Tensor] = None, progress: bool = True, codec: Optional[LatentCodec] = None,
                  masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw ``num`` samples with the config's sampler; ``[num, C, *S]`` images in [-1, 1].

    For latent diffusion the UNet generates latents and ``codec`` (the frozen first stage)
    decodes them into images. For a mask-conditioned model (``model.cond_channels``), ``masks``
    ``[num, K, *S]`` in {0, 1} give one image per mask (None: the null condition, unconditional);
    a latent denoiser sees them area-pooled to its grid (:func:`~meddiff.diffusion.condition_on_grid`).
    """
    if cfg.autoencoder.enabled and codec is None:
        raise ValueError("a latent-diffusion model samples latents: pass the autoencoder (codec) to decode them")
    diffusion = build_diffusion(cfg.diffusion)
    sampler = build_sampler(cfg.sampler, diffusion)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    autocast = autocast_factory(device, autocast_dtype(device, cfg.train.mixed_precision))
    image_grid = (cfg.data.image_size,) * cfg.model.spatial_dims
    if masks is not None and (masks.shape[0] != num or masks.shape[1] != cfg.model.cond_channels
                              or tuple(masks.shape[2:]) != image_grid):
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not fit {num} samples of a model with "
                         f"model.cond_channels={cfg.model.cond_channels} at data.image_size={cfg.data.image_size}")
    if y is None and cfg.model.num_classes:
        y = torch.arange(num) % cfg.model.num_classes
    shape = sample_shape(cfg, num)
    cond = None if masks is None else condition_on_grid(mask_to_condition(masks), shape[2:])
    out = generate(
        model, sampler, shape=shape, num_inference_steps=cfg.sampler.num_inference_steps,
        y=y, guidance_scale=cfg.sampler.guidance_scale, generator=gen, device=device, autocast=autocast,
        progress=progress, cond=cond,
    )
    if codec is None:
        return out
    return codec.to(device).decode(out).clamp(-1.0, 1.0)
