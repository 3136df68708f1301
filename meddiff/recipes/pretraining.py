"""Public pre-training before a simulated study (``pretraining.steps``): one command for
"pre-train on public data, fine-tune with DP at every site".

The public data is the split manifest's ``public`` patients (``partition.public_fraction``,
carved out before the sites were assigned), or, for the embedded phantoms, the generator's own
stream, which no site draws from (each site has its own seed stream and scanner). Training is
centralized and non-private: public data needs no guarantee, and the sites' guarantee does not
cover it (the run's ``init_from.json`` says so). The study then starts from the pre-trained EMA
weights exactly as from ``train.init_from``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from configs import ExperimentConfig
from meddiff.recipes.centralized import train_centralized
from meddiff.recipes.sites import public_dataset

#: The pre-training's run directory inside the study's.
PRETRAINING_DIR = "public_pretraining"


def pretraining_config(cfg: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """The centralized run that pre-trains ``cfg``'s model: the ``pretraining`` steps, batch and
    learning rate, every parameter trained, no DP, written to ``<run_dir>/public_pretraining``."""
    p = cfg.pretraining
    train = dataclasses.replace(cfg.train, steps=p.steps, batch_size=p.batch_size, lr=p.lr, init_from="", trainable="all",
                                warmup_steps=min(cfg.train.warmup_steps, p.steps // 10))
    output = dataclasses.replace(cfg.output, root=str(run_dir), name=PRETRAINING_DIR, checkpoint_every=p.steps,
                                 sample_every=0)
    return dataclasses.replace(cfg, train=train, output=output, privacy=dataclasses.replace(cfg.privacy, enabled=False),
                               pretraining=dataclasses.replace(p, steps=0))


def pretrained_start(cfg: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """``cfg`` starting from the pre-training in ``run_dir`` (``train.init_from`` set to its last
    checkpoint, ``pretraining.steps`` spent); ``cfg`` itself when ``pretraining.steps`` is 0."""
    if not cfg.pretraining.steps:
        return cfg
    checkpoint = (Path(run_dir) / PRETRAINING_DIR / "checkpoints" / "last.pt").resolve()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(checkpoint)),
                               pretraining=dataclasses.replace(cfg.pretraining, steps=0))


def pretrain_on_public(cfg: ExperimentConfig, manifest: Optional[dict[str, Any]], run_dir: Path, *,
                       say=print, progress: bool = True) -> ExperimentConfig:
    """Run the public pre-training of ``cfg`` into ``run_dir`` unless an earlier start of the
    same run finished it; returns :func:`pretrained_start`."""
    if not cfg.pretraining.steps:
        return cfg
    if cfg.autoencoder.enabled:
        raise ValueError("pretraining.steps pre-trains a pixel-space denoiser; for latent diffusion pre-train with "
                         "`meddiff train` and pass train.init_from (and autoencoder.mode=public for the autoencoder)")
    start = pretrained_start(cfg, run_dir)
    checkpoint = Path(start.train.init_from)
    if checkpoint.is_file():
        say(f"[meddiff] public pre-training: reusing {checkpoint}")
        return start
    dataset = public_dataset(manifest, cfg) if manifest is not None else None  # refused when the split has none
    source = "the split's public patients" if manifest is not None else "phantoms that no site draws"
    say(f"[meddiff] public pre-training: {cfg.pretraining.steps} non-private steps on {source}")
    train_centralized(pretraining_config(cfg, Path(run_dir)), progress=progress, dataset=dataset)
    return start
