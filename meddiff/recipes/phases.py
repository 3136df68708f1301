"""Kinds of training as objects: one registry entry per kind, asked by every layer.

A :class:`TrainingPhase` knows, for a given :class:`~configs.ExperimentConfig`, what it trains
(model, objective, optimizer), how much (rounds, local steps, batch size), whether it is private,
how its held-out loss is measured, and how its rounds are named and saved. The federated server,
the sites, the privacy accounting and the reports ask the phase object; none of them compares
phase names. A study trains the phases of :func:`study_phases` in registry order; a new kind of
training is one new entry in :data:`PHASES`.

Latent diffusion (Rombach et al. 2022) is two phases: ``autoencoder`` (the KL first stage) and
``diffusion`` (the UNet, on the frozen autoencoder's latents). A pixel-space study is ``diffusion``
alone. Mask-conditioned synthesis (``model.cond_channels > 0``) is ``mask_diffusion``: the same
UNet objective with the mask concatenated to ``x_t``; with ``autoencoder.enabled`` it follows the
``autoencoder`` phase (trained on the images alone) and conditions the latent UNet on the mask
pooled to the latent grid. A translation study (``data.target_sequence`` set) is ``translation``
(the target's denoiser given the source) or ``translation_regression`` (the L1 baseline), chosen by
``train.translation_objective``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from configs import ExperimentConfig
from meddiff.recipes.build import (build_autoencoder, build_autoencoder_objective, build_conditioned_diffusion,
                                   build_diffusion, build_lr_schedule, build_masked_dataset, build_optimizer, build_unet)
from meddiff.data import ImageChannels
from meddiff.nets.autoencoder import AutoencoderObjective
from meddiff.recipes.phase_base import TrainingPhase
from meddiff.recipes.translation_infer import regress_translation, require_codec, sample_translation
from meddiff.recipes.translation_data import (build_paired_dataset, build_translation_diffusion, build_translation_regression,
                                              build_translation_unet, translating)


class AutoencoderPhase(TrainingPhase):
    """Latent diffusion's first stage: the KL autoencoder (MONAI ``AutoencoderKL``), trained
    federated with DP (``autoencoder.mode: dp``), without (``not_private``), or not at all
    (``public``: pre-trained on public data)."""

    name, order, checkpoint_prefix = "autoencoder", 0, "ae_round"
    produces_codec = True
    metric_name = "reconstruction L1"
    seed_salt = (1,)

    def federated(self, cfg: ExperimentConfig) -> bool:
        return cfg.autoencoder.enabled and cfg.autoencoder.mode != "public"

    def num_rounds(self, cfg: ExperimentConfig) -> int:
        return cfg.autoencoder.num_rounds

    def local_steps(self, cfg: ExperimentConfig) -> int:
        return cfg.autoencoder.local_steps

    def batch_size(self, cfg: ExperimentConfig) -> int:
        return cfg.autoencoder.batch_size

    def is_private(self, cfg: ExperimentConfig) -> bool:
        return cfg.privacy.enabled and cfg.autoencoder.mode == "dp"

    def initial_state(self, initial) -> Optional[dict]:
        return initial.autoencoder

    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        if not cfg.autoencoder.enabled:
            raise ValueError("an autoencoder phase was asked for, but this config has autoencoder.enabled=false")
        return build_autoencoder(cfg)

    def build_objective(self, cfg: ExperimentConfig):
        return build_autoencoder_objective(cfg)

    def build_optimizer(self, cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=cfg.autoencoder.lr, weight_decay=cfg.train.weight_decay)

    def grad_sample_mode(self, cfg: ExperimentConfig) -> str:
        # vmap's per-image gradients are written for the diffusion loss; this phase uses bk (or hooks)
        return "hooks" if cfg.privacy.grad_sample_mode == "hooks" else "bk"

    def examples(self, cfg: ExperimentConfig, data):
        """The images alone: in a mask-conditioned study the autoencoder never sees the masks."""
        return ImageChannels(data, cfg.image_channels)

    def held_out_objective(self, cfg: ExperimentConfig):
        return AutoencoderObjective()

    def held_out_losses(self, model, objective, x0, y, generator, cfg) -> torch.Tensor:
        """Mean absolute error of the deterministic reconstruction ``decode(mu(x))``."""
        return objective.reconstruction_error(model, x0)

    def banner(self, cfg: ExperimentConfig) -> str:
        ae = cfg.autoencoder
        return (f"phase 1: autoencoder, {ae.num_rounds} rounds x {ae.local_steps} local steps "
                f"({'site DP-SGD' if ae.mode == 'dp' else 'NOT private'})")


class DiffusionPhase(TrainingPhase):
    """The ADM UNet's denoising objective (Ho et al. 2020, eq. 14; Dhariwal & Nichol 2021), on
    images, or on the first stage's latents for latent diffusion."""

    name, order, checkpoint_prefix = "diffusion", 1, "round"
    draws_samples = trains_study_model = True

    def federated(self, cfg: ExperimentConfig) -> bool:
        # a mask-conditioned study trains mask_diffusion instead, a translation study a translation phase
        return not cfg.model.cond_channels and not translating(cfg)

    def num_rounds(self, cfg: ExperimentConfig) -> int:
        return cfg.federation.num_rounds

    def local_steps(self, cfg: ExperimentConfig) -> int:
        return cfg.federation.local_steps

    def batch_size(self, cfg: ExperimentConfig) -> int:
        return cfg.train.batch_size

    def is_private(self, cfg: ExperimentConfig) -> bool:
        return cfg.privacy.enabled

    def trains_on_latents(self, cfg: ExperimentConfig) -> bool:
        return cfg.autoencoder.enabled

    def initial_state(self, initial) -> Optional[dict]:
        return initial.unet

    def server_ema_decay(self, cfg: ExperimentConfig) -> Optional[float]:
        return cfg.federation.server_ema_decay

    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        return build_unet(cfg)

    def build_objective(self, cfg: ExperimentConfig):
        return build_diffusion(cfg.diffusion)

    def build_optimizer(self, cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
        return build_optimizer(cfg.train, params)

    def noise_multiplicity(self, cfg: ExperimentConfig) -> int:
        return cfg.diffusion.noise_multiplicity

    def label_dropout(self, cfg: ExperimentConfig) -> float:
        return cfg.train.label_dropout

    def lr_schedule(self, cfg: ExperimentConfig, optimizer, server_round: int):
        """The study's schedule runs across rounds: round ``r`` starts at step ``(r - 1) * local_steps``."""
        steps = self.local_steps(cfg)
        return build_lr_schedule(cfg.train, optimizer, self.num_rounds(cfg) * steps, start_step=(server_round - 1) * steps)

    def held_out_losses(self, model, objective, x0, y, generator, cfg) -> torch.Tensor:
        """The denoising loss averaged over 4 (t, noise) draws per example."""
        return objective.training_losses(model, x0, y=y if cfg.model.num_classes else None, noise_multiplicity=4,
                                         generator=generator)

    def scope(self, scope: str) -> str:
        return scope

    def banner(self, cfg: ExperimentConfig) -> str:
        if cfg.autoencoder.enabled:
            return (f"phase 2: latent diffusion UNet on {cfg.model.in_channels} x {cfg.unet_input_size}^{cfg.model.spatial_dims} "
                    f"latents, {self.num_rounds(cfg)} rounds")
        return f"{self.num_rounds(cfg)} rounds x {self.local_steps(cfg)} local steps at {cfg.federation.num_sites} site(s)"


class MaskDiffusionPhase(DiffusionPhase):
    """Mask-conditioned synthesis: the denoiser sees ``cat([x_t, mask])`` (Dorjsembe et al. 2024,
    Med-DDPM), the mask dropped to the null condition at ``train.cond_dropout`` for classifier-free
    guidance (Ho & Salimans 2022). Its examples are images packed with their masks
    (:class:`meddiff.data.PackedMasks`), so loaders and per-example gradient engines carry them
    as ``(x0, y)`` pairs; for latent diffusion, as latents packed with the mask area-pooled to the
    latent grid (:meth:`meddiff.latent.LatentCodec.encode_packed`). Everything else is the
    diffusion phase's."""

    name, checkpoint_prefix = "mask_diffusion", "mask_round"
    packs_masks = True

    def federated(self, cfg: ExperimentConfig) -> bool:
        return cfg.model.cond_channels > 0

    def build_objective(self, cfg: ExperimentConfig):
        return build_conditioned_diffusion(cfg)

    def held_out_objective(self, cfg: ExperimentConfig):
        # held-out loss of the model given the mask, unweighted: comparable across train.lesion_weight
        return build_conditioned_diffusion(cfg, cond_dropout=0.0, plain=True)

    def training_data(self, cfg: ExperimentConfig):
        return build_masked_dataset(cfg)

    def banner(self, cfg: ExperimentConfig) -> str:
        return f"mask-conditioned diffusion ({cfg.model.cond_channels} mask channels): " + super().banner(cfg)


class TranslationPhase(DiffusionPhase):
    """Cross-modality translation by conditional diffusion: the denoiser of the target image sees
    ``cat([x_t, source])`` (Saharia et al. 2022, Palette; Dorjsembe et al. 2024 for the
    concatenation). Examples are targets packed with their sources
    (:class:`meddiff.data.paired.PackedSource`); sampling is DDIM from noise given the source.
    Rounds, steps, DP and the schedule are the diffusion phase's."""

    name, checkpoint_prefix = "translation", "translation_round"
    draws_samples = False  # no unconditional sample grids or FID: `meddiff evaluate --task translation` scores it
    stochastic = True  # a translation is a draw (several may be averaged)
    packs_source = True
    objective = "diffusion"  # its train.translation_objective

    def federated(self, cfg: ExperimentConfig) -> bool:
        return translating(cfg) and cfg.train.translation_objective == self.objective

    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        return build_translation_unet(cfg)

    def build_objective(self, cfg: ExperimentConfig):
        return build_translation_diffusion(cfg)

    def training_data(self, cfg: ExperimentConfig):
        return build_paired_dataset(cfg)

    def translate(self, model, cfg: ExperimentConfig, source: torch.Tensor, *, samples: int = 1, seed: int = 0,
                  device="cpu", codec=None) -> torch.Tensor:
        """``source [N, C_s, *S]`` in [-1, 1] to targets ``[N, C, *S]``: the mean of ``samples`` DDIM
        draws (latent diffusion: in the latents of ``codec``, decoded)."""
        return sample_translation(model, cfg, source, samples=samples, seed=seed, device=device, codec=codec)

    def banner(self, cfg: ExperimentConfig) -> str:
        d = cfg.data
        return f"translation {d.source_sequence} -> {d.target_sequence} ({self.objective}): " + super().banner(cfg)


class TranslationRegressionPhase(TranslationPhase):
    """The translation baseline: the same conditioned UNet predicting the target from the source in
    one pass (t fixed at 0), trained with L1 (:class:`meddiff.diffusion.DirectRegression`, Pix2Pix
    without the GAN)."""

    name, checkpoint_prefix = "translation_regression", "regression_round"
    metric_name = "held-out L1"
    objective, stochastic = "regression", False  # one deterministic pass

    def build_objective(self, cfg: ExperimentConfig):
        return build_translation_regression(cfg)

    def noise_multiplicity(self, cfg: ExperimentConfig) -> int:
        return 1  # the loss is deterministic

    @torch.no_grad()
    def translate(self, model, cfg: ExperimentConfig, source: torch.Tensor, *, samples: int = 1, seed: int = 0,
                  device="cpu", codec=None) -> torch.Tensor:
        """One forward pass (``samples`` and ``seed`` do not apply: the baseline is deterministic)."""
        require_codec(cfg, codec)
        return regress_translation(self.build_objective(cfg), model, source, device=device, codec=codec)

    def held_out_losses(self, model, objective, x0, y, generator, cfg) -> torch.Tensor:
        """The L1 of the one-pass translation."""
        return objective.training_losses(model, x0)


AUTOENCODER, DIFFUSION, MASK_DIFFUSION = AutoencoderPhase(), DiffusionPhase(), MaskDiffusionPhase()
TRANSLATION, TRANSLATION_REGRESSION = TranslationPhase(), TranslationRegressionPhase()

#: Every kind of training, in study order.
PHASES: dict[str, TrainingPhase] = {p.name: p for p in sorted(
    (AUTOENCODER, DIFFUSION, MASK_DIFFUSION, TRANSLATION, TRANSLATION_REGRESSION), key=lambda p: p.order)}

#: The translation phase of each ``train.translation_objective``.
TRANSLATION_OBJECTIVES: dict[str, TrainingPhase] = {p.objective: p for p in (TRANSLATION, TRANSLATION_REGRESSION)}

#: The phase that produces the study's final model (a record without a phase belongs to it).
FINAL_PHASE = DIFFUSION


def phase_named(name: Optional[str]) -> TrainingPhase:
    """The registry entry ``name`` (empty or None: the final phase); a clear error otherwise."""
    if not name:
        return FINAL_PHASE
    try:
        return PHASES[str(name)]
    except KeyError:
        raise ValueError(f"unknown training phase {name!r}; expected one of {sorted(PHASES)}") from None


def trained_phase(extra: Mapping[str, Any]) -> TrainingPhase:
    """The phase whose weights a checkpoint holds (its ``extra``: a federated round's ``phase``, or
    an autoencoder checkpoint's ``kind``; neither: the final phase)."""
    return phase_named(extra.get("phase", extra.get("kind")))


def study_phases(cfg: ExperimentConfig) -> list[TrainingPhase]:
    """The phases ``cfg`` trains in federated rounds, in order."""
    return [p for p in PHASES.values() if p.federated(cfg)]


def denoiser_phase(cfg: ExperimentConfig) -> TrainingPhase:
    """The phase that trains ``cfg``'s model (its denoiser, or its translation model)."""
    return next(p for p in study_phases(cfg) if p.trains_study_model)


def private_plan(cfg: ExperimentConfig) -> dict[str, tuple[int, int]]:
    """Every DP phase of the study as ``{name: (batch_size, planned_steps)}``, for calibration."""
    return {p.name: (p.batch_size(cfg), p.planned_steps(cfg)) for p in study_phases(cfg) if p.is_private(cfg)}
