"""``meddiff train``: centralized training on the whole dataset, the baseline that federated runs
are compared against.

Writes ``config.yaml``, ``metrics.csv`` (step, loss, lr, examples/s), checkpoints every
``output.checkpoint_every`` steps plus ``checkpoints/last.pt``, and EMA sample grids. For latent
diffusion it first trains (or loads) the autoencoder, encodes the data once, trains the UNet on
the latents, and every checkpoint carries the autoencoder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from configs import ExperimentConfig, config_to_dict
from meddiff.recipes.build import (build_lr_schedule, build_optimizer, build_unet, check_labels,
                           sample_spacing)
from meddiff.checkpoint import save_checkpoint
from meddiff.device import autocast_dtype, autocast_factory, resolve_device
from meddiff.ema import EMA
from meddiff.recipes.first_stage import train_first_stage
from meddiff.recipes.initial import InitialWeights, load_initial_weights, start_from
from meddiff.recipes.phases import denoiser_phase
from meddiff.latent import LatentCodec, encode_dataset
from meddiff.outputs import write_samples
from meddiff.recipes.runs import MetricsCSV, create_run_dir
from meddiff.train import cycle, seed_everything, train_loop
from meddiff.recipes.sample import sample_images


def _training_data(cfg: ExperimentConfig, run_dir: Path, device: torch.device, progress: bool,
                   initial: Optional[InitialWeights], images: Optional[Dataset]) -> tuple[Dataset, Optional[LatentCodec]]:
    """The images (``images``, or the data the config's denoiser phase trains on: images, or images
    packed with their masks), or for latent diffusion their latents and the first stage that made them."""
    dataset = images if images is not None else denoiser_phase(cfg).training_data(cfg)
    check_labels(dataset, cfg.model)
    codec = None
    if cfg.autoencoder.enabled:
        codec = train_first_stage(cfg, dataset, run_dir=run_dir, device=device, progress=progress, initial=initial)
        dataset = encode_dataset(codec, dataset, device=device, progress=progress)
        codec.to(device)
    if len(dataset) < cfg.train.batch_size:
        raise ValueError(f"the dataset has {len(dataset)} examples, fewer than train.batch_size={cfg.train.batch_size}")
    return dataset, codec


class CentralizedRun:
    """The model, its EMA and optimizer, and what is written at each step of one run."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, device: torch.device, codec: Optional[LatentCodec],
                 progress: bool, initial: Optional[InitialWeights] = None):
        self.cfg, self.run_dir, self.device, self.codec, self.progress = cfg, run_dir, device, codec, progress
        self.phase = denoiser_phase(cfg)
        self.model = self.phase.build_model(cfg)
        start_from(self.model, self.phase, initial)
        self.model.to(device)
        self.optimizer = build_optimizer(cfg.train, self.model.parameters())
        self.lr_schedule = build_lr_schedule(cfg.train, self.optimizer, cfg.train.steps)
        self.ema = EMA(self.model, decay=cfg.train.ema_decay)
        self.metrics = MetricsCSV(run_dir / "metrics.csv", ["step", "loss", "lr", "examples_per_s", "elapsed_s"])
        self._cfg_dict = config_to_dict(cfg)
        self._extra = {"autoencoder": codec.to_payload()} if codec is not None else {}
        if initial is not None:
            self._extra["init_from"] = json.dumps(initial.record())
        self._window: list[float] = []
        self._started = time.perf_counter()

    def save(self, step: int) -> None:
        for name in (f"step_{step:06d}.pt", "last.pt"):
            save_checkpoint(self.run_dir / "checkpoints" / name, model_state=self.model.state_dict(),
                            ema_state=self.ema.state_dict(), config=self._cfg_dict, step=step,
                            extra={"ema_updates": self.ema.num_updates, **self._extra})

    def draw(self, step: int) -> None:
        if not self.phase.draws_samples:  # a translation model is scored by `meddiff evaluate --task translation`
            return
        ema_model = build_unet(self.cfg).to(self.device)
        self.ema.copy_to(ema_model)
        samples = sample_images(ema_model, self.cfg, num=self.cfg.output.num_samples, device=self.device,
                                seed=self.cfg.train.seed, progress=self.progress, codec=self.codec)
        write_samples(samples, self.run_dir / "samples", f"step_{step:06d}", spacing=sample_spacing(self.cfg))

    def on_step(self, index: int, loss: float) -> None:
        """Log every ``train.log_every`` steps; checkpoint and draw at their intervals (the last
        step's are written once training ends)."""
        tc, oc, step = self.cfg.train, self.cfg.output, index + 1
        self._window.append(loss)
        if step % tc.log_every == 0 or step == tc.steps:
            elapsed = time.perf_counter() - self._started
            self.metrics.write({"step": step, "loss": sum(self._window) / len(self._window),
                                "lr": self.optimizer.param_groups[0]["lr"],
                                "examples_per_s": step * tc.batch_size / elapsed, "elapsed_s": elapsed})
            self._window.clear()
        if step % oc.checkpoint_every == 0 and step != tc.steps:
            self.save(step)
        if oc.sample_every and step % oc.sample_every == 0 and step != tc.steps:
            self.draw(step)


def train_centralized(cfg: ExperimentConfig, *, progress: bool = True, dataset: Optional[Dataset] = None) -> Path:
    """Run ``cfg`` centrally (see the module docstring) on ``dataset`` (default: the config's
    data; e.g. a manifest's public split for pre-training); returns the run directory."""
    if cfg.privacy.enabled:
        raise ValueError("privacy.enabled=true applies to federated sites; `meddiff train` is the non-private baseline")
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    device = resolve_device(tc.device)
    run_dir = create_run_dir(cfg.output, cfg, kind="train")
    initial = load_initial_weights(cfg)
    if initial is not None:
        initial.write_record(run_dir)
        print(f"[meddiff] initial weights: {initial.path} (sha256 {initial.sha256[:16]})")
    dataset, codec = _training_data(cfg, run_dir, device, progress, initial, dataset)
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, num_workers=tc.num_workers,
                        generator=torch.Generator().manual_seed(tc.seed), pin_memory=device.type == "cuda")
    run = CentralizedRun(cfg, run_dir, device, codec, progress, initial)
    n_params = sum(p.numel() for p in run.model.parameters())
    print(f"[meddiff] run dir {run_dir}\n[meddiff] {n_params / 1e6:.2f}M parameters, {len(dataset)} examples, device {device}")
    with run.metrics:
        result = train_loop(
            model=run.model, objective=run.phase.build_objective(cfg), optimizer=run.optimizer, batches=cycle(loader),
            steps=tc.steps, device=device, noise_multiplicity=cfg.diffusion.noise_multiplicity,
            label_dropout=tc.label_dropout, grad_clip=tc.grad_clip,
            autocast=autocast_factory(device, autocast_dtype(device, tc.mixed_precision)), ema=run.ema,
            lr_schedule=run.lr_schedule, generator=torch.Generator(device=device).manual_seed(tc.seed + 1),
            progress=progress, desc="train", on_step=run.on_step,
        )
    run.save(tc.steps)
    run.draw(tc.steps)
    print(f"[meddiff] {result.steps} steps in {result.seconds:.1f}s; final loss {result.losses[-1]:.4f}; "
          f"samples in {run_dir / 'samples'}")
    return run_dir
