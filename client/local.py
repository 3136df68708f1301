"""A site's round of local training and its held-out evaluation, as plain functions."""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Mapping, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from configs import ExperimentConfig
from meddiff.build import build_diffusion, build_model, build_optimizer
from meddiff.device import autocast_dtype, autocast_factory, resolve_device
from meddiff.train import cycle, train_loop
from privacy.accounting import PrivacyLedger
from privacy.engine import make_private
from privacy.site import Calibration


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


def unpredictable_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS entropy pool, for DP noise and Poisson sampling.

    They must not derive from the experiment seed, which the server knows: a server that can
    replay the noise can subtract it, and one that knows which records were sampled voids
    the subsampling amplification the accountant assumes.
    """
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def non_private_metrics() -> dict[str, float]:
    """The privacy keys every reply carries, for a site training without DP (epsilon is infinite)."""
    return {"epsilon": math.inf, "delta": 0.0, "noise_multiplier": 0.0, "sample_rate": 0.0, "clip_fraction": 0.0,
            "budget_exhausted": 0}


def local_train(
    cfg: ExperimentConfig,
    global_state: Mapping[str, torch.Tensor],
    dataset: Dataset,
    *,
    server_round: int,
    site_index: int,
    proximal_mu: float = 0.0,
    progress: bool = False,
    ledger: Optional[PrivacyLedger] = None,
    calibration: Optional[Calibration] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the global model for ``federation.local_steps`` steps on the site's data.

    Without DP, randomness (batch order, t, noise, label dropout) is seeded by (train.seed, round,
    site), so a round replays identically after a crash. With ``privacy.enabled`` the site runs
    DP-SGD (Opacus, Poisson sampling, logical batches of ``calibration.batch_size`` split into
    physical ones of ``privacy.max_physical_batch_size``) at the calibrated sigma, on the accountant
    history from ``ledger``, and records the round in the ledger; DP noise and sampling use
    unpredictable randomness. Returns the new (unwrapped) state dict and the metrics.
    """
    tc = cfg.train
    private = cfg.privacy.enabled
    if private and (ledger is None or calibration is None):
        raise ValueError("privacy.enabled=true needs the site's ledger and calibration; refusing to train without DP")
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
    gen = torch.Generator(device=device).manual_seed(seed)
    loop = dict(diffusion=build_diffusion(cfg.diffusion), steps=cfg.federation.local_steps, device=device,
                noise_multiplicity=cfg.diffusion.noise_multiplicity, label_dropout=tc.label_dropout,
                autocast=autocast_factory(device, autocast_dtype(device, tc.mixed_precision)), generator=gen,
                progress=progress, desc=f"site {site_index} round {server_round}")
    start = time.perf_counter()
    if private:
        loader = DataLoader(dataset, batch_size=calibration.batch_size, num_workers=tc.num_workers,
                            generator=unpredictable_generator())
        dp = make_private(model, optimizer, loader, noise_multiplier=calibration.noise_multiplier,
                          max_grad_norm=calibration.max_grad_norm, noise_multiplicity=cfg.diffusion.noise_multiplicity,
                          accountant_history=ledger.history, grad_sample_mode=cfg.privacy.grad_sample_mode,
                          noise_generator=unpredictable_generator(device))
        batches = dp.batches(cfg.privacy.max_physical_batch_size)
        try:
            result = train_loop(model=dp.model, optimizer=dp.optimizer, batches=batches, step_fn=dp.step_fn,
                                optimizer_stepped=dp.optimizer_stepped, **loop)
        finally:
            batches.close()
        sigma, q, _ = dp.history[-1]
        ledger.record(dp.history, {"study": calibration.study, "round": server_round, "steps": result.steps,
                                   "noise_multiplier": sigma, "sample_rate": q, "max_grad_norm": calibration.max_grad_norm,
                                   "clip_fraction": dp.stats.clip_fraction})
        privacy_metrics = {"epsilon": ledger.epsilon(), "delta": ledger.delta, "noise_multiplier": sigma, "sample_rate": q,
                           "clip_fraction": dp.stats.clip_fraction, "budget_exhausted": 0}
        state = dp.state_dict()
    else:
        loader = DataLoader(dataset, batch_size=min(tc.batch_size, len(dataset)), shuffle=True, drop_last=True,
                            num_workers=tc.num_workers, generator=torch.Generator().manual_seed(seed))
        result = train_loop(model=model, optimizer=optimizer, batches=cycle(loader), grad_clip=tc.grad_clip, **loop)
        privacy_metrics = non_private_metrics()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metrics = {"num-examples": len(dataset), "train_loss": result.mean_loss, "steps": result.steps,
               "site-index": site_index, "seconds": time.perf_counter() - start, **privacy_metrics}
    return state, metrics


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
    return {"num-examples": count, "eval_loss": total / max(count, 1), "site-index": site_index, "feature-count": 0}


def local_feature_stats(cfg: ExperimentConfig, dataset: Dataset):
    """The site's share of a federated FID: feature statistics of its held-out images (no images)."""
    from meddiff.evaluate import build_encoder, site_feature_stats

    ev = cfg.evaluation
    return site_feature_stats(build_encoder(ev.encoder, ev.encoder_weights or None), dataset, max_examples=ev.max_real)
