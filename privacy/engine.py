"""Opacus DP-SGD around a plain training loop, with sound noise multiplicity.

``make_private`` wraps ``(model, optimizer, loader)`` with Opacus ``PrivacyEngine(accountant="rdp")``
in ``hooks`` mode and Poisson sampling, on a restored accountant history, so the same plain
training loop runs with and without DP (GUIDE principle 5).

Noise multiplicity (Dockhorn et al. 2022, arXiv 2210.09929, Sec. 3.2): the diffusion loss expands
each image to K rows with ``repeat_interleave``. Opacus computes one gradient per *row*; before it
clips, :func:`make_private` averages them back to one gradient per *image*
(:func:`meddiff.diffusion.collapse_noise_multiplicity`), so each image contributes exactly one
clipped gradient and the accountant's epsilon is correct. Hand-written as an instance hook on
the ``DPOptimizer`` because Opacus has no notion of several rows per privacy unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from meddiff.checkpoint import unwrap_state_dict
from meddiff.diffusion import collapse_noise_multiplicity


@dataclass
class ClipStats:
    """Per-step clipping statistics: the fraction of per-image gradients whose norm exceeded C."""

    clipped: int = 0
    total: int = 0
    steps: list[float] = field(default_factory=list)

    @property
    def clip_fraction(self) -> float:
        return self.clipped / self.total if self.total else 0.0


@dataclass
class PrivateTraining:
    model: nn.Module
    optimizer: DPOptimizer
    loader: DataLoader
    engine: PrivacyEngine
    stats: ClipStats

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The unwrapped model's weights (no ``_module.`` prefix): what may cross a boundary."""
        return {k: v.detach().cpu() for k, v in unwrap_state_dict(self.model.state_dict()).items()}

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history ``[(noise_multiplier, sample_rate, steps), ...]``."""
        return [tuple(h) for h in self.engine.accountant.history]


def _install_collapse(optimizer: DPOptimizer, noise_multiplicity: int, stats: ClipStats) -> None:
    """Average per-row gradients to per-image ones before Opacus clips; record the clip fraction."""
    original = optimizer.clip_and_accumulate
    k = int(noise_multiplicity)

    def clip_and_accumulate():
        images = None
        for p in optimizer.params:
            gs = p.grad_sample
            if isinstance(gs, list):
                gs = torch.cat(gs, dim=0)
            if gs is None:
                continue
            collapsed = collapse_noise_multiplicity(gs, k)
            if images is None:
                images = collapsed.shape[0]
            if collapsed.shape[0] != images:
                raise RuntimeError(f"per-sample gradients disagree on the number of images ({collapsed.shape[0]} vs {images})")
            p.grad_sample = collapsed
        if images:
            norms = torch.stack([p.grad_sample.reshape(images, -1).norm(2, dim=-1) for p in optimizer.params], dim=1).norm(2, dim=1)
            clipped = int((norms > optimizer.max_grad_norm).sum())
            stats.clipped += clipped
            stats.total += images
            stats.steps.append(clipped / images)
        return original()

    optimizer.clip_and_accumulate = clip_and_accumulate


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    noise_multiplicity: int = 1,
    accountant_history: Sequence[tuple[float, float, int]] = (),
    grad_sample_mode: str = "hooks",
    noise_generator: Optional[torch.Generator] = None,
) -> PrivateTraining:
    """Wrap for DP-SGD with Poisson sampling on a restored RDP accountant.

    Args:
        noise_multiplier: sigma, calibrated once for the site's whole study (never per round).
        max_grad_norm: per-image clipping norm C.
        noise_multiplicity: K rows per image in the loss (collapsed before clipping).
        accountant_history: the site's ledger so far; the new steps are appended to it.
    Returns:
        The wrapped model, optimizer and (Poisson) loader, the engine and clipping statistics.
    """
    if grad_sample_mode != "hooks":
        raise ValueError(f"grad_sample_mode {grad_sample_mode!r} is not supported yet; use 'hooks'")
    if noise_multiplier < 0 or max_grad_norm <= 0:
        raise ValueError(f"need noise_multiplier >= 0 and max_grad_norm > 0, got {noise_multiplier}, {max_grad_norm}")
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [tuple(h) for h in accountant_history]
    private_model, private_opt, private_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks", noise_generator=noise_generator,
    )
    stats = ClipStats()
    _install_collapse(private_opt, noise_multiplicity, stats)
    return PrivateTraining(private_model, private_opt, private_loader, engine, stats)
