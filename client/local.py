"""A site's round of local training and its held-out evaluation, as plain functions."""

from __future__ import annotations

import hashlib
import time
from typing import Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from configs import ExperimentConfig
from meddiff.build import build_diffusion, build_model, build_optimizer
from meddiff.device import autocast_dtype, autocast_factory, resolve_device
from meddiff.train import cycle, train_loop


def round_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. global seed, round, site), stable across processes."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def add_proximal_term(optimizer: torch.optim.Optimizer, global_params: list[torch.Tensor], mu: float) -> None:
    """FedProx (Li et al. 2020, eq. 2): add ``mu * (w - w_global)`` to each gradient before a step.

    Uses an optimizer pre-step hook so the training step itself stays plain.
    """
    if mu <= 0:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def hook(opt, args, kwargs):
        with torch.no_grad():
            for p, g in zip(params, global_params):
                if p.grad is not None:
                    p.grad.add_(p - g, alpha=mu)

    optimizer.register_step_pre_hook(hook)


def local_train(
    cfg: ExperimentConfig,
    global_state: Mapping[str, torch.Tensor],
    dataset: Dataset,
    *,
    server_round: int,
    site_index: int,
    proximal_mu: float = 0.0,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the global model for ``federation.local_steps`` steps on the site's data.

    Randomness (batch order, t, noise, label dropout) is seeded by (train.seed, round, site), so
    a round replays identically after a crash. Returns the new state dict and the metrics.
    """
    if cfg.privacy.enabled:
        raise ValueError("privacy.enabled=true, but this site has no DP-SGD support yet; refusing to train without it")
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if len(dataset) == 0:
        raise ValueError(f"site {site_index} has no training data")
    device = resolve_device(tc.device)
    seed = round_seed(tc.seed, server_round, site_index)
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data.image_size)
    model.load_state_dict(global_state)
    model.to(device)
    optimizer = build_optimizer(tc, model.parameters())
    add_proximal_term(optimizer, [p.detach().clone() for p in model.parameters()], proximal_mu)
    batch = min(tc.batch_size, len(dataset))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=tc.num_workers,
                        generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    result = train_loop(
        model=model, diffusion=build_diffusion(cfg.diffusion), optimizer=optimizer, batches=cycle(loader),
        steps=cfg.federation.local_steps, device=device, noise_multiplicity=cfg.diffusion.noise_multiplicity,
        label_dropout=tc.label_dropout, grad_clip=tc.grad_clip,
        autocast=autocast_factory(device, autocast_dtype(device, tc.mixed_precision)), generator=gen,
        progress=progress, desc=f"site {site_index} round {server_round}",
    )
    metrics = {"num-examples": len(dataset), "train_loss": result.mean_loss, "steps": result.steps,
               "site-index": site_index, "seconds": time.perf_counter() - start}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics


@torch.no_grad()
def local_evaluate(cfg: ExperimentConfig, state: Mapping[str, torch.Tensor], dataset: Dataset, *, site_index: int,
                   max_examples: int = 256) -> dict[str, float]:
    """Held-out denoising loss: the per-example loss averaged over 4 fixed (t, noise) draws."""
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, cfg.data.image_size)
    model.load_state_dict(state)
    model.to(device).eval()
    diffusion = build_diffusion(cfg.diffusion)
    gen = torch.Generator(device=device).manual_seed(round_seed(cfg.train.seed, site_index, 7))
    n = min(len(dataset), max_examples)
    total, count = 0.0, 0
    for x0, y in DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=64):
        x0 = x0.to(device)
        y = y.to(device) if cfg.model.num_classes else None
        losses = diffusion.training_losses(model, x0, y=y, noise_multiplicity=4, generator=gen)
        total += float(losses.sum())
        count += len(losses)
    return {"num-examples": count, "eval_loss": total / max(count, 1), "site-index": site_index}
