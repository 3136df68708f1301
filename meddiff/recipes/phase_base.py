"""The interface of a kind of training: what every layer may ask a phase (see :mod:`meddiff.recipes.phases`,
which holds the registry of the kinds)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from configs import ExperimentConfig
from meddiff.recipes.build import build_image_dataset


class TrainingPhase:
    """One kind of federated (or centralized) training; subclasses fill in the kind's answers.

    Attributes:
        name: the phase's name in configs, checkpoints, metrics and messages.
        order: position in a study (earlier phases train first).
        checkpoint_prefix: per-round checkpoints are ``<prefix>_<round>.pt``.
        draws_samples: the server draws sample grids and federated FID from it.
        trains_study_model: it trains the model the study is for (the privacy calibration's main
            phase, the summary's final rounds, the plots' main panels).
        produces_codec: its trained model is the frozen encoder later phases train on.
        packs_masks: its examples are images packed with their masks (:class:`meddiff.data.PackedMasks`).
        packs_source: its examples are translation targets packed with their source images
            (:class:`meddiff.data.paired.PackedSource`).
        metric_name: what its held-out loss is, in words.
        seed_salt: appended to (seed, round, site) so phases draw independent randomness.
    """

    name = ""
    order = 0
    checkpoint_prefix = ""
    draws_samples = False
    trains_study_model = False
    produces_codec = False
    packs_masks = False
    packs_source = False
    metric_name = "held-out loss"
    seed_salt: tuple[int, ...] = ()

    # ---------------------------------------------------------------- what and how much
    def federated(self, cfg: ExperimentConfig) -> bool:
        """Whether the study trains this phase in federated rounds."""
        raise NotImplementedError

    def num_rounds(self, cfg: ExperimentConfig) -> int:
        raise NotImplementedError

    def local_steps(self, cfg: ExperimentConfig) -> int:
        raise NotImplementedError

    def batch_size(self, cfg: ExperimentConfig) -> int:
        raise NotImplementedError

    def planned_steps(self, cfg: ExperimentConfig) -> int:
        """Every local step a site takes in this phase of the study."""
        return self.num_rounds(cfg) * self.local_steps(cfg)

    def is_private(self, cfg: ExperimentConfig) -> bool:
        """Whether its site training runs DP-SGD under ``cfg``."""
        raise NotImplementedError

    def trains_on_latents(self, cfg: ExperimentConfig) -> bool:
        """Whether its data are the latents of an earlier phase's encoder."""
        return False

    def server_ema_decay(self, cfg: ExperimentConfig) -> Optional[float]:
        """Decay of the server's EMA of the global weights (None: no EMA)."""
        return None

    def initial_state(self, initial) -> Optional[dict]:
        """This phase's share of ``train.init_from`` (a :class:`~meddiff.recipes.initial.InitialWeights`)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the training objects
    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        raise NotImplementedError

    def build_objective(self, cfg: ExperimentConfig):
        raise NotImplementedError

    def build_optimizer(self, cfg: ExperimentConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def noise_multiplicity(self, cfg: ExperimentConfig) -> int:
        return 1

    def label_dropout(self, cfg: ExperimentConfig) -> float:
        return 0.0

    def grad_sample_mode(self, cfg: ExperimentConfig) -> str:
        """Per-example gradient mode under DP."""
        return cfg.privacy.grad_sample_mode

    def lr_schedule(self, cfg: ExperimentConfig, optimizer: torch.optim.Optimizer, server_round: int):
        """The learning-rate schedule of a site's round (None: constant)."""
        return None

    def training_data(self, cfg: ExperimentConfig) -> Dataset:
        """The examples it trains on, as ``(x0, label)`` pairs (default: the config's images)."""
        return build_image_dataset(cfg)

    def examples(self, cfg: ExperimentConfig, data: Dataset) -> Dataset:
        """What it trains and evaluates on out of a site's (or the study's) examples ``data``, which
        are the study denoiser's (images, or images packed with their masks); default: all of them."""
        return data

    def held_out_objective(self, cfg: ExperimentConfig):
        """What :meth:`held_out_losses` measures with (default: the training objective)."""
        return self.build_objective(cfg)

    def held_out_losses(self, model: nn.Module, objective, x0: torch.Tensor, y: Optional[torch.Tensor],
                        generator: torch.Generator, cfg: ExperimentConfig) -> torch.Tensor:
        """Per-example held-out loss ``[N]`` of ``model`` on ``x0 [N, C, *S]``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- names in records
    def scope(self, scope: str) -> str:
        """A metric scope (``global``, ``site_0``) as TensorBoard tags it."""
        return f"{self.name}/{scope}"

    def round_name(self, cfg: ExperimentConfig) -> str:
        """How the console names its rounds ("autoencoder round", or plain "round")."""
        return f"{self.name} round" if cfg.autoencoder.enabled else "round"

    def banner(self, cfg: ExperimentConfig) -> str:
        """The line that opens the phase on the console."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<phase {self.name}>"
