"""The plain-PyTorch training step and loop (no knowledge of privacy or federation).

Differential privacy wraps ``(model, optimizer, loader)`` before the loop; the
same loop then runs unchanged. The centralized ``meddiff train`` run is the baseline that federated
runs are compared against.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from configs import ExperimentConfig, config_to_dict
from meddiff.build import (
    build_diffusion,
    build_image_dataset,
    build_lr_schedule,
    build_optimizer,
    build_sampler,
    build_unet,
    check_labels,
    sample_shape,
    sample_spacing,
)
from meddiff.checkpoint import save_checkpoint
from meddiff.device import autocast_dtype, autocast_factory, resolve_device
from meddiff.diffusion import GaussianDiffusion
from meddiff.ema import EMA
from meddiff.latent import LatentCodec, encode_dataset
from meddiff.nets.autoencoder import AutoencoderObjective
from meddiff.outputs import write_samples
from meddiff.runs import MetricsCSV, create_run_dir
from meddiff.sampling import generate


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
    num_classes = getattr(model, "num_classes", 0) or getattr(getattr(model, "_module", None), "num_classes", 0)
    model.train()
    result = LoopResult(steps=0, examples=0, seconds=0.0)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)
    loss_sum, rows = 0.0, 0
    while result.steps < steps:
        x0, y = next(batches)
        x0 = x0.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True) if num_classes else None
        if y is not None:
            y = drop_labels(y, p=label_dropout, null_label=num_classes, generator=generator)
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
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_images(model: nn.Module, cfg: ExperimentConfig, *, num: int, device: torch.device, seed: int = 0,
                  y: Optional[torch.Tensor] = None, progress: bool = True, codec: Optional[LatentCodec] = None) -> torch.Tensor:
    """Draw ``num`` samples with the config's sampler; ``[num, C, *S]`` images in [-1, 1].

    For latent diffusion the UNet generates latents and ``codec`` (the frozen first stage)
    decodes them into images.
    """
    if cfg.autoencoder.enabled and codec is None:
        raise ValueError("a latent-diffusion model samples latents: pass the autoencoder (codec) to decode them")
    diffusion = build_diffusion(cfg.diffusion)
    sampler = build_sampler(cfg.sampler, diffusion)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    autocast = autocast_factory(device, autocast_dtype(device, cfg.train.mixed_precision))
    if y is None and cfg.model.num_classes:
        y = torch.arange(num) % cfg.model.num_classes
    out = generate(
        model, sampler, shape=sample_shape(cfg, num), num_inference_steps=cfg.sampler.num_inference_steps,
        y=y, guidance_scale=cfg.sampler.guidance_scale, generator=gen, device=device, autocast=autocast,
        progress=progress,
    )
    if codec is None:
        return out
    return codec.to(device).decode(out).clamp(-1.0, 1.0)


def train_centralized(cfg: ExperimentConfig, *, progress: bool = True) -> Path:
    """Centralized training: the baseline for federated runs. Returns the run directory.

    Writes ``config.yaml``, ``metrics.csv`` (step, loss, lr, examples/s), checkpoints every
    ``output.checkpoint_every`` steps plus ``checkpoints/last.pt``, and EMA sample grids. For latent
    diffusion it first trains (or loads) the autoencoder, encodes the data once, trains the UNet
    on the latents, and every checkpoint carries the autoencoder.
    """
    if cfg.privacy.enabled:
        raise ValueError("privacy.enabled=true applies to federated sites; `meddiff train` is the non-private baseline")
    tc, oc = cfg.train, cfg.output
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    device = resolve_device(tc.device)
    run_dir = create_run_dir(oc, cfg, kind="train")

    dataset = build_image_dataset(cfg)
    check_labels(dataset, cfg.model)
    codec = None
    if cfg.autoencoder.enabled:
        from meddiff.first_stage import train_first_stage

        codec = train_first_stage(cfg, dataset, run_dir=run_dir, device=device, progress=progress)
        dataset = encode_dataset(codec, dataset, device=device, progress=progress)
        codec.to(device)
    if len(dataset) < tc.batch_size:
        raise ValueError(f"the dataset has {len(dataset)} examples, fewer than train.batch_size={tc.batch_size}")
    loader = DataLoader(
        dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, num_workers=tc.num_workers,
        generator=torch.Generator().manual_seed(tc.seed), pin_memory=device.type == "cuda",
    )
    model = build_unet(cfg).to(device)
    diffusion = build_diffusion(cfg.diffusion)
    optimizer = build_optimizer(tc, model.parameters())
    lr_schedule = build_lr_schedule(tc, optimizer, tc.steps)
    ema = EMA(model, decay=tc.ema_decay)
    autocast = autocast_factory(device, autocast_dtype(device, tc.mixed_precision))
    gen = torch.Generator(device=device).manual_seed(tc.seed + 1)
    cfg_dict = config_to_dict(cfg)
    ckpt_dir = run_dir / "checkpoints"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[meddiff] run dir {run_dir}\n[meddiff] {n_params / 1e6:.2f}M parameters, {len(dataset)} examples, device {device}")
    codec_extra = {"autoencoder": codec.to_payload()} if codec is not None else {}

    window: list[float] = []
    t0 = time.perf_counter()
    metrics = MetricsCSV(run_dir / "metrics.csv", ["step", "loss", "lr", "examples_per_s", "elapsed_s"])

    def save(step: int) -> None:
        for name in (f"step_{step:06d}.pt", "last.pt"):
            save_checkpoint(ckpt_dir / name, model_state=model.state_dict(), ema_state=ema.state_dict(),
                            config=cfg_dict, step=step, extra={"ema_updates": ema.num_updates, **codec_extra})

    def draw(step: int) -> None:
        ema_model = build_unet(cfg).to(device)
        ema.copy_to(ema_model)
        samples = sample_images(ema_model, cfg, num=oc.num_samples, device=device, seed=tc.seed, progress=progress,
                                codec=codec)
        write_samples(samples, run_dir / "samples", f"step_{step:06d}", spacing=sample_spacing(cfg))

    def on_step(i: int, loss: float) -> None:
        step = i + 1
        window.append(loss)
        if step % tc.log_every == 0 or step == tc.steps:
            elapsed = time.perf_counter() - t0
            metrics.write({"step": step, "loss": sum(window) / len(window), "lr": optimizer.param_groups[0]["lr"],
                           "examples_per_s": step * tc.batch_size / elapsed, "elapsed_s": elapsed})
            window.clear()
        if step % oc.checkpoint_every == 0 and step != tc.steps:
            save(step)
        if oc.sample_every and step % oc.sample_every == 0 and step != tc.steps:
            draw(step)

    with metrics:
        result = train_loop(
            model=model, objective=diffusion, optimizer=optimizer, batches=cycle(loader), steps=tc.steps,
            device=device, noise_multiplicity=cfg.diffusion.noise_multiplicity, label_dropout=tc.label_dropout,
            grad_clip=tc.grad_clip, autocast=autocast, ema=ema, lr_schedule=lr_schedule, generator=gen,
            progress=progress, desc="train", on_step=on_step,
        )
    save(tc.steps)
    draw(tc.steps)
    print(f"[meddiff] {result.steps} steps in {result.seconds:.1f}s; final loss {result.losses[-1]:.4f}; "
          f"samples in {run_dir / 'samples'}")
    return run_dir
