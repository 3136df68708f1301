"""The plain-PyTorch training step and loop (no knowledge of privacy or federation).

Differential privacy wraps ``(model, optimizer, loader)`` before the loop; the same loop then runs
unchanged, at a site (:mod:`client.local`) or centrally (:mod:`meddiff.recipes.centralized`).
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from meddiff.diffusion import GaussianDiffusion
from meddiff.ema import EMA
from meddiff.nets.autoencoder import AutoencoderObjective


def drop_labels(y: torch.Tensor, *, p: float, null_label: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``p`` (classifier-free guidance training)."""
    if p <= 0 or y.numel() == 0:
        return y
    dev = generator.device if generator is not None else y.device
    mask = (torch.rand(y.shape, generator=generator, device=dev) < p).to(y.device)
    return torch.where(mask, torch.full_like(y, null_label), y)


def train_step(
    model: nn.Module,
    objective: GaussianDiffusion | AutoencoderObjective,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    noise_multiplicity: int = 1,
    grad_clip: float = 0.0,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    generator: Optional[torch.Generator] = None,
) -> float:
    """One optimizer step on the batch mean of the per-example loss.

    ``objective.training_losses(model, x0, y=, noise_multiplicity=, generator=) -> [N]``: the
    diffusion loss, or the autoencoder's (the first stage of latent diffusion). The mean divides
    by ``max(N, 1)`` so an empty (Poisson) batch still steps. Shapes: ``x0 [N, C, *S]``, ``y [N]``
    or None. Returns the loss as a float.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        per_example = objective.training_losses(model, x0, y=y, noise_multiplicity=noise_multiplicity, generator=generator)
    loss = per_example.sum() / max(per_example.shape[0], 1)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


def cycle(loader: Iterable) -> Iterator:
    """Iterate over a loader forever (a new epoch, and a new shuffle, each pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yielded no batches: the dataset is empty or smaller than one batch")


def _next_batch(batches: Iterator, device: torch.device, *, num_classes: int, label_dropout: float,
                generator: Optional[torch.Generator]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(x0 [N, C, *S], y [N] or None)`` on ``device``; labels dropped to the null label at
    ``label_dropout`` (none for an unconditional model)."""
    x0, y = next(batches)
    x0 = x0.to(device, non_blocking=True)
    if not num_classes:
        return x0, None
    return x0, drop_labels(y.to(device, non_blocking=True), p=label_dropout, null_label=num_classes, generator=generator)


@dataclass
class LoopResult:
    steps: int
    examples: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)


def train_loop(
    *,
    model: nn.Module,
    objective: GaussianDiffusion | AutoencoderObjective,
    optimizer: torch.optim.Optimizer,
    batches: Iterator,
    steps: int,
    device: torch.device,
    noise_multiplicity: int = 1,
    label_dropout: float = 0.0,
    grad_clip: float = 0.0,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    ema: Optional[EMA] = None,
    lr_schedule=None,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    desc: str = "train",
    on_step: Optional[Callable[[int, float], None]] = None,
    step_fn: Callable[..., float] = train_step,
    optimizer_stepped: Optional[Callable[[], bool]] = None,
) -> LoopResult:
    """Run ``steps`` optimizer steps; ``on_step(step_index, loss)`` is called after each.

    ``step_fn`` has :func:`train_step`'s signature (DP swaps in its own). When the optimizer may
    skip a step, as DP-SGD's does for the physical batches that make up one logical batch,
    ``optimizer_stepped()`` says whether the last call really stepped: only real steps count,
    and EMA and the learning-rate schedule advance only on them. The loss reported for a step
    is the mean over all examples of its logical batch.
    """
    num_classes = getattr(model, "num_classes", 0)
    model.train()
    result = LoopResult(steps=0, examples=0, seconds=0.0)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)
    loss_sum, rows = 0.0, 0
    while result.steps < steps:
        x0, y = _next_batch(batches, device, num_classes=num_classes, label_dropout=label_dropout, generator=generator)
        loss = step_fn(
            model, objective, optimizer, x0, y,
            noise_multiplicity=noise_multiplicity, grad_clip=grad_clip, autocast=autocast, generator=generator,
        )
        result.examples += x0.shape[0]
        loss_sum, rows = loss_sum + loss * x0.shape[0], rows + x0.shape[0]
        if optimizer_stepped is not None and not optimizer_stepped():
            continue  # one physical batch of a larger logical batch: no step yet
        loss, loss_sum, rows = loss_sum / max(rows, 1), 0.0, 0
        if ema is not None:
            ema.update(model)
        if lr_schedule is not None:
            lr_schedule.step()
        result.steps += 1
        result.losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(result.steps - 1, loss)
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
