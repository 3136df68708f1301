"""A site's round of local training and its held-out evaluation, as plain functions."""

from __future__ import annotations

import hashlib
import math
import time
from typing import Callable, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from configs import ExperimentConfig
from meddiff.device import autocast_dtype, autocast_factory, resolve_device
from meddiff.train import cycle, train_loop
from meddiff.evaluate import build_encoder, site_feature_stats
from meddiff.nets.trainable import update_keys
from meddiff.recipes.phases import DIFFUSION, TrainingPhase
from meddiff.recipes.translation_eval import site_translation_scores
from privacy.site import SitePrivacy
from protocol import evaluate_metrics, non_private_metrics, privacy_metrics, train_metrics
from protocol.keys import TRANSLATION_MAE, TRANSLATION_PSNR, TRANSLATION_SSIM


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


def _phase_model(cfg: ExperimentConfig, phase: TrainingPhase, global_state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The phase's model, loaded with the server's weights."""
    model = phase.build_model(cfg)
    model.load_state_dict(global_state)
    return model


def local_train(
    cfg: ExperimentConfig,
    global_state: Mapping[str, torch.Tensor],
    dataset: Dataset,
    *,
    server_round: int,
    site_index: int,
    proximal_mu: float = 0.0,
    progress: bool = False,
    privacy: Optional[SitePrivacy] = None,
    phase: TrainingPhase = DIFFUSION,
    on_step: Optional[Callable[[int, float], None]] = None,
    epsilon_probe: Optional[list] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the global model of ``phase`` for its local steps on the site's data.

    ``dataset`` holds what the phase trains on: images, or pre-encoded latents for a phase that
    :meth:`~meddiff.recipes.phases.TrainingPhase.trains_on_latents`. Without DP, randomness (batch order, t, noise, label dropout) is seeded by (train.seed,
    round, site, phase), so a round replays identically after a crash. With ``privacy.enabled`` the
    site runs DP-SGD (Opacus, Poisson sampling, logical batches of the phase's calibrated batch
    size split into physical ones of ``privacy.max_physical_batch_size``) at the calibrated sigma,
    on the accountant history from ``ledger``, and records the round, with its phase, in the
    ledger; DP noise and sampling use unpredictable randomness. ``on_step(step_index, loss)`` is
    called after every real optimizer step; under DP, ``epsilon_probe`` (a list) receives a
    function that returns the epsilon spent so far. Returns the new (unwrapped) state dict and
    the metrics. Only the tensors that trained are returned (:func:`meddiff.nets.trainable.update_keys`).
    """
    tc = cfg.train
    private = phase.is_private(cfg)
    if private and privacy is None:
        raise ValueError("privacy.enabled=true needs the site's privacy (ledger and calibration); refusing to train without DP")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if len(dataset) == 0:
        raise ValueError(f"site {site_index} has no training data")
    device = resolve_device(tc.device)
    seed = round_seed(tc.seed, server_round, site_index, *phase.seed_salt)
    torch.manual_seed(seed)
    model = _phase_model(cfg, phase, global_state).to(device)
    sent = update_keys(model)
    optimizer = phase.build_optimizer(cfg, model.parameters())
    add_proximal_term(optimizer, [p.detach().clone() for p in model.parameters()], proximal_mu)
    loop = _loop_settings(cfg, phase, optimizer, server_round, site_index, seed, device, progress, on_step)
    start = time.perf_counter()
    if private:
        result, spent, state = _private_round(cfg, phase, model, optimizer, dataset, loop, privacy, server_round,
                                              epsilon_probe)
    else:
        loader = DataLoader(dataset, batch_size=min(phase.batch_size(cfg), len(dataset)), shuffle=True, drop_last=True,
                            num_workers=tc.num_workers, generator=torch.Generator().manual_seed(seed))
        result = train_loop(model=model, optimizer=optimizer, batches=cycle(loader), grad_clip=tc.grad_clip, **loop)
        spent = non_private_metrics()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {k: state[k] for k in sent}  # frozen tensors never change: they stay home
    if not math.isfinite(result.mean_loss):
        raise FloatingPointError(f"site {site_index}: the {phase.name} training loss became {result.mean_loss} in round "
                                 f"{server_round}; check train.lr and the data (no update is sent)")
    metrics = train_metrics(num_examples=len(dataset), train_loss=result.mean_loss, steps=result.steps,
                            site_index=site_index, seconds=time.perf_counter() - start, privacy=spent)
    return state, metrics


def _loop_settings(cfg: ExperimentConfig, phase: TrainingPhase, optimizer: torch.optim.Optimizer, server_round: int,
                   site_index: int, seed: int, device: torch.device, progress: bool,
                   on_step: Optional[Callable[[int, float], None]]) -> dict:
    """Keyword arguments of :func:`meddiff.train.train_loop` for one site's round."""
    return dict(objective=phase.build_objective(cfg), steps=phase.local_steps(cfg), device=device,
                noise_multiplicity=phase.noise_multiplicity(cfg), label_dropout=phase.label_dropout(cfg),
                autocast=autocast_factory(device, autocast_dtype(device, cfg.train.mixed_precision)),
                generator=torch.Generator(device=device).manual_seed(seed), progress=progress,
                desc=f"site {site_index} {phase.name} round {server_round}", on_step=on_step,
                lr_schedule=phase.lr_schedule(cfg, optimizer, server_round))


def _private_round(cfg: ExperimentConfig, phase: TrainingPhase, model: nn.Module, optimizer: torch.optim.Optimizer,
                   dataset: Dataset, loop: dict, privacy: SitePrivacy, server_round: int, epsilon_probe: Optional[list]):
    """DP-SGD for the round's steps, recorded in the site's ledger. ``(result, privacy metrics, state)``."""
    dp = privacy.wrap(phase, model, optimizer, dataset, loop["device"])
    if epsilon_probe is not None:
        epsilon_probe.append(privacy.epsilon_during(dp))
    batches = dp.batches(cfg.privacy.max_physical_batch_size)
    try:
        result = train_loop(model=dp.model, optimizer=dp.optimizer, batches=batches, step_fn=dp.step_fn,
                            optimizer_stepped=dp.optimizer_stepped, **loop)
    finally:
        batches.close()
    return result, privacy_metrics(**privacy.record(dp, phase, server_round, result.steps)), dp.state_dict()


@torch.no_grad()
def local_evaluate(cfg: ExperimentConfig, state: Mapping[str, torch.Tensor], dataset: Dataset, *, site_index: int,
                   max_examples: int = 256, phase: TrainingPhase = DIFFUSION) -> dict[str, float]:
    """Held-out loss of the global model of ``phase`` on the first ``max_examples`` of ``dataset``
    (:meth:`~meddiff.recipes.phases.TrainingPhase.held_out_losses`, with fixed randomness); for a
    translation phase also SSIM, PSNR and MAE on ``evaluation.translation_examples`` of them, spread."""
    device = resolve_device(cfg.train.device)
    model, objective = _phase_model(cfg, phase, state).to(device).eval(), phase.held_out_objective(cfg)
    gen = torch.Generator(device=device).manual_seed(round_seed(cfg.train.seed, site_index, 7))
    n = min(len(dataset), max_examples)
    total, count = 0.0, 0
    for x0, y in DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=64):
        losses = phase.held_out_losses(model, objective, x0.to(device), y.to(device), gen, cfg)
        total += float(losses.sum())
        count += len(losses)
    return evaluate_metrics(num_examples=count, eval_loss=total / max(count, 1), site_index=site_index,
                            translation=_translation_scores(cfg, phase, model, dataset, site_index, device))


def _translation_scores(cfg: ExperimentConfig, phase: TrainingPhase, model: nn.Module, dataset: Dataset,
                        site_index: int, device) -> Optional[dict[str, float]]:
    """The site's translation scores (``None`` unless ``phase`` translates and they are asked for)."""
    n = min(len(dataset), cfg.evaluation.translation_examples)
    if not (phase.packs_source and n) or phase.trains_on_latents(cfg):  # latent sites hold latents, not images
        return None
    spread = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()  # over the site's patients, not the first
    packed = torch.stack([dataset[i][0] for i in spread])
    scores = site_translation_scores(phase, model, cfg, packed, seed=round_seed(cfg.train.seed, site_index, 11), device=device)
    return {TRANSLATION_SSIM: scores["ssim"], TRANSLATION_PSNR: scores["psnr"], TRANSLATION_MAE: scores["mae"]}


def local_feature_stats(cfg: ExperimentConfig, dataset: Dataset):
    """The site's share of a federated FID: feature statistics of its held-out images (no images)."""
    ev = cfg.evaluation
    return site_feature_stats(build_encoder(ev.encoder, ev.encoder_weights or None), dataset, max_examples=ev.max_real,
                              image_channels=cfg.image_channels)
