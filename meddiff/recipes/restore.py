"""Models rebuilt from checkpoints: the denoiser from its stored config and (EMA) weights, and the
frozen autoencoder a latent-diffusion checkpoint carries. Never unpickles code."""

from __future__ import annotations

import torch

from configs import ConfigError, ExperimentConfig, load_config_dict
from meddiff.checkpoint import check_finite, load_checkpoint
from meddiff.latent import LatentCodec
from meddiff.recipes.build import build_autoencoder
from meddiff.recipes.phases import denoiser_phase, trained_phase


def model_from_checkpoint(path, *, use_ema: bool = True, device: str | torch.device = "cpu"):
    """Rebuild the model from a checkpoint's stored config and load its (EMA) weights.

    Returns ``(model, config, checkpoint)``. Never unpickles code (``weights_only=True``).
    """
    ckpt = load_checkpoint(path)
    if trained_phase(ckpt.extra).produces_codec:
        raise ValueError(f"{path} holds latent diffusion's phase-1 autoencoder, not a denoiser; use a diffusion-phase "
                         "checkpoint (checkpoints/round_*.pt, or last.pt once phase 2 has run)")
    try:
        cfg = load_config_dict(ckpt.config)
    except ConfigError as exc:
        raise ValueError(f"{path}: the stored config is not valid for this meddiff version: {exc}") from None
    model = denoiser_phase(cfg).build_model(cfg)  # the UNet, with the source's channels for translation
    state = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.model
    check_finite(state, str(path))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the model built from the stored config: {exc}") from None
    return model.to(device).eval(), cfg, ckpt


def codec_from_checkpoint(ckpt, cfg: ExperimentConfig, *, source: str = "checkpoint"):
    """The frozen autoencoder a latent-diffusion checkpoint carries (``extra["autoencoder"]``), or
    None for a pixel-space model."""
    if not cfg.autoencoder.enabled:
        return None
    payload = ckpt.extra.get("autoencoder")
    if payload is None:
        raise ValueError(f"{source}: a latent-diffusion checkpoint without its autoencoder (phase 1 not finished?)")
    return LatentCodec.from_payload(payload, build_autoencoder(cfg), source=source)
