"""One clipped gradient per privacy unit: the clipping step every per-sample-gradient mode shares.

The unit is a record (one image or slice) or a patient (all of its records in the step). Per
parameter, the per-sample gradients arrive as ``[N*K, ...]`` rows (Opacus ``hooks``: K noise draws
per record) or ``[N, ...]`` records (``bk``, ``vmap``); they are averaged to one gradient per
record (Dockhorn et al. 2022, arXiv 2210.09929, Sec. 3.2), then to one gradient per patient (the
gradient of the mean of its records' losses; Charles et al. 2024, "Fine-Tuning Large Language
Models with User-Level Differential Privacy", Alg. 1 with user-level sampling), and only then
clipped to C. A patient's whole influence on a step is therefore at most C, however many records
it has: the sensitivity the accountant assumes for the patient-level sample rate.

Hand-written because Opacus clips one gradient per row and has no notion of several rows or records
per privacy unit (no user-level DP; its issue #366).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from meddiff.diffusion import collapse_noise_multiplicity

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer


@dataclass
class ClipStats:
    """Clipping statistics: how many per-unit gradients had a norm above C, of how many."""

    clipped: int = 0
    total: int = 0
    rows: Optional[int] = None  # rows the model saw in its last forward (N*K), for the shape check
    #: ``[N]`` the unit (0..U-1) of each record of the current physical batch; None: each record is its own unit
    groups: Optional[torch.Tensor] = None

    @property
    def clip_fraction(self) -> float:
        return self.clipped / self.total if self.total else 0.0


def unit_means(groups: Optional[torch.Tensor], records: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``[U, N]`` matrix whose row ``u`` averages unit ``u``'s records (``groups [N]``: unit
    ``0..U-1`` of each record, every unit present; None: each record is its own unit, no matrix).

    Built once per step, so grouping a parameter's gradients is one matrix product with no
    host-device synchronisation (a per-parameter ``bincount`` and ``groups.max()`` synchronise
    277 times a step for the default ADM on a GPU)."""
    if groups is None:
        return None
    if groups.shape != (records,):
        raise RuntimeError(f"per-sample gradients hold {records} records but the batch names the patient "
                           f"of {groups.shape[0]}; refusing to clip (one clipped gradient per patient)")
    groups = groups.to(like.device)
    units = int(groups.max()) + 1 if records else 0
    member = torch.zeros(units, records, dtype=like.dtype, device=like.device)
    member[groups, torch.arange(records, device=like.device)] = 1.0
    return member / member.sum(dim=1, keepdim=True).clamp(min=1.0)


def group_mean(per_record: torch.Tensor, means: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N, ...]`` per-record gradients to ``[U, ...]`` per-unit means (``means``: :func:`unit_means`)."""
    if means is None:
        return per_record
    flat = per_record.reshape(per_record.shape[0], math.prod(per_record.shape[1:]))
    return (means @ flat).reshape(means.shape[0], *per_record.shape[1:])


def unit_gradients(optimizer: DPOptimizer, noise_multiplicity: int, stats: ClipStats) -> list[torch.Tensor]:
    """Per parameter, the ``[U, ...]`` gradient of each unit of the physical batch (before clipping)."""
    from opacus.optimizers.optimizer import _check_processed_flag

    grads, units, means = [], None, None
    for p in optimizer.params:
        gs = p.grad_sample
        _check_processed_flag(gs)
        if isinstance(gs, list):
            gs = torch.cat(gs, dim=0)
        if stats.rows is not None and gs.shape[0] != stats.rows:
            raise RuntimeError(f"per-sample gradients have {gs.shape[0]} rows but the model's last forward had "
                               f"{stats.rows}; refusing to clip (one clipped gradient per image)")
        per_record = collapse_noise_multiplicity(gs, noise_multiplicity).to(p.dtype)
        if means is None or (means.dtype, means.device) != (per_record.dtype, per_record.device):
            means = unit_means(stats.groups, per_record.shape[0], per_record)
        per_unit = group_mean(per_record, means)
        units = per_unit.shape[0] if units is None else units
        if per_unit.shape[0] != units:
            raise RuntimeError(f"per-sample gradients disagree on the number of units ({per_unit.shape[0]} vs {units})")
        grads.append(per_unit)
    return grads


def install_unit_clipping(optimizer: DPOptimizer, noise_multiplicity: int, stats: ClipStats) -> None:
    """Replace the optimizer's clipping with one pass that groups (:func:`unit_gradients`), clips and records.

    Per-unit norms are computed once, both for clipping (Opacus's rule: factor
    ``min(1, C / (norm + 1e-6))``) and for the clip fraction; the clipped sum is accumulated in
    ``p.summed_grad`` exactly as ``DPOptimizer.clip_and_accumulate`` does, so Opacus then adds
    noise of std ``sigma * C`` to the sum. ``scale_grad`` divides by ``optimizer.expected_batch_size``
    (expected records, or expected patients ``q * P``, which may be fractional) with the
    accumulated-iteration count computed once per step (Opacus recomputes it for every parameter,
    which is quadratic in the parameter count: about 40 ms a step for the default ADM's 277
    tensors on CPU).
    """
    from opacus.optimizers.optimizer import _mark_as_processed

    k = int(noise_multiplicity)

    def clip_and_accumulate():
        grads = unit_gradients(optimizer, k, stats)
        units = grads[0].shape[0] if grads else 0
        if units:
            norms = torch.stack([g.reshape(units, -1).norm(2, dim=-1) for g in grads], dim=1).norm(2, dim=1)
            factor = (optimizer.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            stats.clipped += int((norms > optimizer.max_grad_norm).sum())
            stats.total += units
        for p, g in zip(optimizer.params, grads):
            summed = torch.einsum("i,i...", factor.to(g.dtype), g) if units else torch.zeros_like(p)
            p.summed_grad = summed if p.summed_grad is None else p.summed_grad + summed
            _mark_as_processed(p.grad_sample)

    def scale_grad():
        if optimizer.loss_reduction == "mean":
            divisor = optimizer.expected_batch_size * optimizer.accumulated_iterations
            for p in optimizer.params:
                p.grad /= divisor

    optimizer.clip_and_accumulate = clip_and_accumulate
    optimizer.scale_grad = scale_grad
