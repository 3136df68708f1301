"""A site's round of local training and its held-out evaluation, as plain functions."""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from configs import ExperimentConfig
from meddiff.build import (build_autoencoder, build_autoencoder_objective, build_diffusion, build_lr_schedule, build_optimizer,
                           build_unet)
from meddiff.device import autocast_dtype, autocast_factory, resolve_device
from meddiff.train import cycle, train_loop
from privacy.accounting import PrivacyLedger
from privacy.engine import make_private
from privacy.site import Calibration, phase_is_private
from protocol import evaluate_metrics, non_private_metrics, privacy_metrics, train_metrics


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


PHASES = ("autoencoder", "diffusion")


@dataclass
class Stage:
    """What one phase trains at a site: the model, its optimizer, objective and step budget."""

    phase: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: object
    steps: int
    batch_size: int
    noise_multiplicity: int
    label_dropout: float
    grad_sample_mode: str


def build_stage(cfg: ExperimentConfig, phase: str, global_state: Mapping[str, torch.Tensor]) -> Stage:
    """Phase ``autoencoder`` (latent diffusion's first stage) or ``diffusion`` (the UNet, on images
    or latents), loaded with the server's weights."""
    from meddiff.first_stage import build_autoencoder_optimizer

    tc = cfg.train
    if phase == "autoencoder":
        if not cfg.autoencoder.enabled:
            raise ValueError("the server asked for an autoencoder round but this config has autoencoder.enabled=false")
        model = build_autoencoder(cfg)
        model.load_state_dict(global_state)
        # vmap's per-image gradients are written for the diffusion loss; the first stage uses bk (or hooks)
        mode = "hooks" if cfg.privacy.grad_sample_mode == "hooks" else "bk"
        return Stage(phase, model, build_autoencoder_optimizer(cfg, model.parameters()), build_autoencoder_objective(cfg),
                     cfg.autoencoder.local_steps, cfg.autoencoder.batch_size, 1, 0.0, mode)
    if phase != "diffusion":
        raise ValueError(f"unknown training phase {phase!r}; expected one of {PHASES}")
    model = build_unet(cfg)
    model.load_state_dict(global_state)
    return Stage(phase, model, build_optimizer(tc, model.parameters()), build_diffusion(cfg.diffusion),
                 cfg.federation.local_steps, tc.batch_size, cfg.diffusion.noise_multiplicity, tc.label_dropout,
                 cfg.privacy.grad_sample_mode)


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
    phase: str = "diffusion",
    on_step: Optional[Callable[[int, float], None]] = None,
    epsilon_probe: Optional[list] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the global model of ``phase`` for its local steps on the site's data.

    ``phase`` is ``diffusion`` (the UNet; ``dataset`` holds images, or pre-encoded latents for
    latent diffusion) or ``autoencoder`` (latent diffusion's first stage, ``autoencoder.local_steps``
    steps). Without DP, randomness (batch order, t, noise, label dropout) is seeded by (train.seed,
    round, site, phase), so a round replays identically after a crash. With ``privacy.enabled`` the
    site runs DP-SGD (Opacus, Poisson sampling, logical batches of the phase's calibrated batch
    size split into physical ones of ``privacy.max_physical_batch_size``) at the calibrated sigma,
    on the accountant history from ``ledger``, and records the round, with its phase, in the
    ledger; DP noise and sampling use unpredictable randomness. ``on_step(step_index, loss)`` is
    called after every real optimizer step; under DP, ``epsilon_probe`` (a list) receives a
    function that returns the epsilon spent so far. Returns the new (unwrapped) state dict and
    the metrics.
    """
    tc = cfg.train
    private = phase_is_private(cfg, phase)
    if private and (ledger is None or calibration is None):
        raise ValueError("privacy.enabled=true needs the site's ledger and calibration; refusing to train without DP")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if len(dataset) == 0:
        raise ValueError(f"site {site_index} has no training data")
    device = resolve_device(tc.device)
    seed = round_seed(tc.seed, server_round, site_index) if phase == "diffusion" else round_seed(tc.seed, server_round, site_index, 1)
    torch.manual_seed(seed)
    stage = build_stage(cfg, phase, global_state)
    model, optimizer = stage.model.to(device), stage.optimizer
    add_proximal_term(optimizer, [p.detach().clone() for p in model.parameters()], proximal_mu)
    loop = _loop_settings(cfg, stage, phase, server_round, site_index, seed, device, progress, on_step)
    start = time.perf_counter()
    if private:
        result, privacy, state = _private_round(cfg, stage, dataset, loop, ledger, calibration, server_round,
                                                epsilon_probe)
    else:
        loader = DataLoader(dataset, batch_size=min(stage.batch_size, len(dataset)), shuffle=True, drop_last=True,
                            num_workers=tc.num_workers, generator=torch.Generator().manual_seed(seed))
        result = train_loop(model=model, optimizer=optimizer, batches=cycle(loader), grad_clip=tc.grad_clip, **loop)
        privacy = non_private_metrics()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not math.isfinite(result.mean_loss):
        raise FloatingPointError(f"site {site_index}: the {phase} training loss became {result.mean_loss} in round "
                                 f"{server_round}; check train.lr and the data (no update is sent)")
    metrics = train_metrics(num_examples=len(dataset), train_loss=result.mean_loss, steps=result.steps,
                            site_index=site_index, seconds=time.perf_counter() - start, privacy=privacy)
    return state, metrics


def _loop_settings(cfg: ExperimentConfig, stage: "Stage", phase: str, server_round: int, site_index: int, seed: int,
                   device: torch.device, progress: bool, on_step: Optional[Callable[[int, float], None]]) -> dict:
    """Keyword arguments of :func:`meddiff.train.train_loop` for one site's round."""
    tc = cfg.train
    loop = dict(objective=stage.objective, steps=stage.steps, device=device, noise_multiplicity=stage.noise_multiplicity,
                label_dropout=stage.label_dropout, autocast=autocast_factory(device, autocast_dtype(device, tc.mixed_precision)),
                generator=torch.Generator(device=device).manual_seed(seed), progress=progress,
                desc=f"site {site_index} {phase} round {server_round}", on_step=on_step)
    if phase == "diffusion":  # the study's learning-rate schedule runs across rounds
        loop["lr_schedule"] = build_lr_schedule(tc, stage.optimizer, cfg.federation.num_rounds * stage.steps,
                                                start_step=(server_round - 1) * stage.steps)
    return loop


def _private_round(cfg: ExperimentConfig, stage: "Stage", dataset: Dataset, loop: dict, ledger: PrivacyLedger,
                   calibration: Calibration, server_round: int, epsilon_probe: Optional[list]):
    """DP-SGD for the round's steps; records the round in the ledger. ``(result, metrics, state)``."""
    plan = calibration.phase(stage.phase)
    loader = DataLoader(dataset, batch_size=plan["batch_size"], num_workers=cfg.train.num_workers,
                        generator=unpredictable_generator())
    dp = make_private(stage.model, stage.optimizer, loader, noise_multiplier=calibration.noise_multiplier,
                      max_grad_norm=calibration.max_grad_norm, noise_multiplicity=stage.noise_multiplicity,
                      accountant_history=ledger.history, grad_sample_mode=stage.grad_sample_mode,
                      noise_generator=unpredictable_generator(loop["device"]))
    if epsilon_probe is not None:
        epsilon_probe.append(lambda: float(dp.engine.accountant.get_epsilon(ledger.delta)))
    batches = dp.batches(cfg.privacy.max_physical_batch_size)
    try:
        result = train_loop(model=dp.model, optimizer=dp.optimizer, batches=batches, step_fn=dp.step_fn,
                            optimizer_stepped=dp.optimizer_stepped, **loop)
    finally:
        batches.close()
    sigma, q, _ = dp.history[-1]
    ledger.record(dp.history, {"study": calibration.study, "phase": stage.phase, "round": server_round, "steps": result.steps,
                               "noise_multiplier": sigma, "sample_rate": q, "max_grad_norm": calibration.max_grad_norm,
                               "clip_fraction": dp.stats.clip_fraction})
    metrics = privacy_metrics(epsilon=ledger.epsilon(), delta=ledger.delta, noise_multiplier=sigma, sample_rate=q,
                              clip_fraction=dp.stats.clip_fraction, budget_exhausted=0)
    return result, metrics, dp.state_dict()


@torch.no_grad()
def local_evaluate(cfg: ExperimentConfig, state: Mapping[str, torch.Tensor], dataset: Dataset, *, site_index: int,
                   max_examples: int = 256, phase: str = "diffusion") -> dict[str, float]:
    """Held-out loss of the global model: the denoising loss averaged over 4 fixed (t, noise)
    draws (``dataset`` holds latents for latent diffusion), or, in the autoencoder phase, the
    mean absolute error of the deterministic reconstruction ``decode(mu(x))``."""
    device = resolve_device(cfg.train.device)
    if phase == "autoencoder":
        from meddiff.nets.autoencoder import AutoencoderObjective

        model, objective = build_autoencoder(cfg), AutoencoderObjective()
    else:
        model, objective = build_unet(cfg), build_diffusion(cfg.diffusion)
    model.load_state_dict(state)
    model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(round_seed(cfg.train.seed, site_index, 7))
    n = min(len(dataset), max_examples)
    total, count = 0.0, 0
    for x0, y in DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=64):
        x0 = x0.to(device)
        if phase == "autoencoder":
            losses = objective.reconstruction_error(model, x0)
        else:
            y = y.to(device) if cfg.model.num_classes else None
            losses = objective.training_losses(model, x0, y=y, noise_multiplicity=4, generator=gen)
        total += float(losses.sum())
        count += len(losses)
    return evaluate_metrics(num_examples=count, eval_loss=total / max(count, 1), site_index=site_index)


def local_feature_stats(cfg: ExperimentConfig, dataset: Dataset):
    """The site's share of a federated FID: feature statistics of its held-out images (no images)."""
    from meddiff.evaluate import build_encoder, site_feature_stats

    ev = cfg.evaluation
    return site_feature_stats(build_encoder(ev.encoder, ev.encoder_weights or None), dataset, max_examples=ev.max_real)
