"""The first stage of latent diffusion outside federation: centralized training, public
pre-training, loading, saving and the scale factor (Rombach et al. 2022, arXiv 2112.10752, Sec. 3).

Federated phase 1 runs the same loop at every site (``client/local.py``); this module serves
``meddiff train`` (the centralized baseline) and ``autoencoder.mode: public`` (a first stage the
server pre-trains on public data, or loads, and never trains on site data).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from configs import ExperimentConfig, config_to_dict, load_config_dict
from meddiff.recipes.build import build_autoencoder, build_image_dataset
from meddiff.checkpoint import load_checkpoint, save_checkpoint
from meddiff.device import autocast_dtype, autocast_factory
from meddiff.latent import LatentCodec, latent_stats
from meddiff.nets.autoencoder import KLAutoencoder
from meddiff.outputs import save_grid_png
from meddiff.recipes.initial import InitialWeights, start_from
from meddiff.recipes.phases import AUTOENCODER
from meddiff.train import cycle, train_loop

#: latents used to estimate the scale factor (enough for a stable standard deviation)
SCALE_EXAMPLES = 1024


def train_autoencoder(cfg: ExperimentConfig, dataset: Dataset, *, device: torch.device, steps: Optional[int] = None,
                      seed: int = 0, progress: bool = True, desc: str = "autoencoder",
                      initial: Optional[InitialWeights] = None) -> tuple[KLAutoencoder, list[float]]:
    """Train the autoencoder centrally for ``steps`` (default ``autoencoder.steps``), from
    ``initial``'s autoencoder when it has one; returns it and its per-step losses."""
    ae = cfg.autoencoder
    if len(dataset) == 0:
        raise ValueError("the autoencoder's training data is empty")
    torch.manual_seed(seed)
    model = AUTOENCODER.build_model(cfg)
    start_from(model, AUTOENCODER, initial)
    model = model.to(device)
    optimizer = AUTOENCODER.build_optimizer(cfg, model.parameters())
    loader = DataLoader(dataset, batch_size=min(ae.batch_size, len(dataset)), shuffle=True, drop_last=True,
                        num_workers=cfg.train.num_workers, generator=torch.Generator().manual_seed(seed))
    result = train_loop(model=model, optimizer=optimizer, batches=cycle(loader), steps=steps or ae.steps, device=device,
                        grad_clip=cfg.train.grad_clip, generator=torch.Generator(device=device).manual_seed(seed + 1),
                        autocast=autocast_factory(device, autocast_dtype(device, cfg.train.mixed_precision)),
                        progress=progress, desc=desc, objective=AUTOENCODER.build_objective(cfg))
    return model.eval(), result.losses


def fit_codec(cfg: ExperimentConfig, autoencoder: KLAutoencoder, dataset: Dataset, *,
              device: torch.device | str = "cpu") -> LatentCodec:
    """The codec with ``autoencoder.scale_factor``, or ``1 / std`` of the latents of ``dataset``."""
    scale = cfg.autoencoder.scale_factor
    if not scale:
        scale = latent_stats(autoencoder, dataset, max_examples=SCALE_EXAMPLES, device=device).scale_factor()
    return LatentCodec(autoencoder.to("cpu"), scale)


def save_codec(path: str | Path, codec: LatentCodec, cfg: ExperimentConfig, *, step: int, extra: Optional[dict] = None) -> Path:
    """An autoencoder checkpoint: its weights, scale factor, digest and the config that made it."""
    return save_checkpoint(path, model_state=codec.autoencoder.state_dict(), config=config_to_dict(cfg), step=step,
                           extra={"kind": AUTOENCODER.name, "autoencoder": codec.to_payload(), **(extra or {})})


def load_codec(path: str | Path, cfg: ExperimentConfig) -> LatentCodec:
    """The first stage stored in ``path`` (an autoencoder checkpoint, or any latent-diffusion
    checkpoint); its autoencoder settings must match ``cfg``'s."""
    ckpt = load_checkpoint(path)
    if "autoencoder" not in ckpt.extra:
        raise ValueError(f"{path}: holds no autoencoder (write one with `meddiff train` on a latent-diffusion config)")
    stored = load_config_dict(ckpt.config).autoencoder
    keys = ("image_channels", "latent_channels", "channels", "num_res_blocks", "attention", "norm_groups")
    differ = [k for k in keys if getattr(stored, k) != getattr(cfg.autoencoder, k)]
    if differ or load_config_dict(ckpt.config).model.spatial_dims != cfg.model.spatial_dims:
        raise ValueError(f"{path}: its autoencoder differs from this config's in {differ or ['model.spatial_dims']}")
    return LatentCodec.from_payload(ckpt.extra["autoencoder"], build_autoencoder(cfg), source=str(path))


def public_codec(cfg: ExperimentConfig, *, device: torch.device, run_dir: Optional[Path] = None,
                 progress: bool = True) -> LatentCodec:
    """``autoencoder.mode: public``: load ``autoencoder.checkpoint``, or pre-train on the public
    data of ``autoencoder.public_dataset`` / ``public_path`` (no site data is involved)."""
    ae = cfg.autoencoder
    if ae.checkpoint:
        return load_codec(ae.checkpoint, cfg)
    public = dataclasses.replace(cfg.data, dataset=ae.public_dataset, path=ae.public_path, split="train")
    dataset = build_image_dataset(cfg, public)
    model, _ = train_autoencoder(cfg, dataset, device=device, seed=cfg.train.seed, progress=progress, desc="autoencoder (public)")
    codec = fit_codec(cfg, model, dataset, device=device)
    if run_dir is not None:
        save_codec(Path(run_dir) / "autoencoder.pt", codec, cfg, step=ae.steps, extra={"trained_on": f"public: {ae.public_path}"})
        write_reconstructions(codec, dataset, Path(run_dir) / "samples" / "autoencoder_reconstructions.png")
    return codec


def train_first_stage(cfg: ExperimentConfig, dataset: Dataset, *, run_dir: Path, device: torch.device,
                      progress: bool = True, initial: Optional[InitialWeights] = None) -> LatentCodec:
    """Latent diffusion's frozen first stage for centralized training: pre-trained on public data /
    loaded (``autoencoder.mode: public``) or trained on ``dataset`` here; saved to
    ``<run>/autoencoder.pt`` with its reconstructions. ``dataset`` holds the study's examples; the
    autoencoder trains on their images alone (:meth:`~meddiff.recipes.phases.AutoencoderPhase.examples`)."""
    if cfg.autoencoder.mode == "public":
        return public_codec(cfg, device=device, run_dir=run_dir, progress=progress)
    dataset = AUTOENCODER.examples(cfg, dataset)
    model, losses = train_autoencoder(cfg, dataset, device=device, seed=cfg.train.seed, progress=progress, initial=initial)
    codec = fit_codec(cfg, model, dataset, device=device)
    save_codec(run_dir / "autoencoder.pt", codec, cfg, step=len(losses), extra={"final_loss": losses[-1]})
    write_reconstructions(codec, dataset, run_dir / "samples" / "autoencoder_reconstructions.png")
    print(f"[meddiff] autoencoder: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, latent scale "
          f"{codec.scale_factor:.4f}; {run_dir / 'autoencoder.pt'}")
    return codec


@torch.no_grad()
def write_reconstructions(codec: LatentCodec, dataset: Dataset, path: Path, *, num: int = 8) -> Path:
    """Originals (top row) above their reconstructions ``decode(encode(x))`` (bottom row), as PNG."""
    x = torch.stack([dataset[i][0] for i in range(min(num, len(dataset)))])
    dev = next(codec.autoencoder.parameters()).device
    recon = codec.decode(codec.encode(x.to(dev))).cpu().clamp(-1, 1)
    return save_grid_png(torch.cat([x, recon]), path, nrow=len(x), upscale=max(1, 96 // x.shape[-1]))
