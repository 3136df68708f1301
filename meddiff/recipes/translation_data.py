"""Translation studies (``data.source_sequence`` -> ``data.target_sequence``): their models,
objectives and paired data, from the config.

The conditional UNet is the study's ADM UNet with the source's channels concatenated to ``x_t``
(``cond_channels`` = the source's channels; ``model.cond_channels`` stays 0, it names masks).
Paired phantoms follow each site's acquisition as single phantoms do; BraTS-layout cases pair two
sequences of one case folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from configs import DataConfig, ExperimentConfig
from meddiff.data.adapters import BRATS_SEQUENCES, index_dataset
from meddiff.data.phantom_anatomy import CONTRASTS
from meddiff.data.paired import PackedSource, PairedImages, PairedVolumeDataset, contrast_to_model
from meddiff.data.phantom_pairs import make_phantom_pairs
from meddiff.data.phantoms import Acquisition
from meddiff.data.readers import DataError
from meddiff.data.records import Record
from meddiff.diffusion import DirectRegression, SpatialConditioning
from meddiff.nets import ADMUNet
from meddiff.nets.trainable import select_trainable
from meddiff.recipes.build import build_diffusion, build_unet_from_section

#: What ``data.source_sequence`` / ``data.target_sequence`` may name ("": no translation).
TRANSLATION_CONTRASTS = ("", *CONTRASTS, *BRATS_SEQUENCES)
SOURCE_CHANNELS = 1  # phantoms and BraTS sequences are single-channel images


def translating(cfg: ExperimentConfig) -> bool:
    """Whether ``cfg`` is a translation study."""
    return bool(cfg.data.target_sequence)


def build_translation_unet(cfg: ExperimentConfig) -> ADMUNet:
    """The study's UNet reading ``cat([x_t, source])`` (the source's channels as ``cond_channels``;
    with latent diffusion ``x_t`` and the source are latents of the one autoencoder)."""
    source = cfg.autoencoder.latent_channels if cfg.autoencoder.enabled else SOURCE_CHANNELS
    model = build_unet_from_section(replace(cfg.model, cond_channels=source), cfg.unet_input_size)
    return select_trainable(model, cfg.train.trainable, lora_rank=cfg.train.lora_rank)


def build_translation_diffusion(cfg: ExperimentConfig) -> SpatialConditioning:
    """The denoising loss of the target given the source (no condition dropout: translation needs
    no unconditional score)."""
    return SpatialConditioning(build_diffusion(cfg.diffusion), image_channels=cfg.model.in_channels, cond_dropout=0.0)


def build_translation_regression(cfg: ExperimentConfig) -> DirectRegression:
    return DirectRegression(image_channels=cfg.model.in_channels)


def phantom_pairs_data(cfg: ExperimentConfig, indices: Sequence[int], *, seed: int, lesion_fraction: float,
                       acquisition: Optional[Acquisition] = None) -> PairedImages:
    """Paired phantoms ``indices`` of the stream ``seed`` (the same anatomy and, for a ``t1`` source,
    the same image as the single phantoms of those indices), in [-1, 1], under ``acquisition``."""
    d, source, target, labels = cfg.data, [], [], []
    kwargs = {"acquisition": acquisition} if acquisition else {}
    for run in _runs(list(indices)):
        pairs = make_phantom_pairs(len(run), d.image_size, seed=seed, source=d.source_sequence, target=d.target_sequence,
                                   lesion_fraction=lesion_fraction, start=run[0], **kwargs)
        source.append(contrast_to_model(pairs.source, d.source_sequence))
        target.append(contrast_to_model(pairs.target, d.target_sequence))
        labels.append(pairs.labels)
    if not labels:
        empty = torch.zeros((0, 1, d.image_size, d.image_size))
        return PairedImages(empty, empty.clone(), torch.zeros(0, dtype=torch.long))
    as_images = lambda parts: torch.from_numpy(np.concatenate(parts))[:, None]  # noqa: E731
    return PairedImages(as_images(target), as_images(source), torch.from_numpy(np.concatenate(labels)))


def _runs(indices: list[int]) -> list[list[int]]:
    """Consecutive runs of ``indices`` (one generator call each)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] + 1 == i:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def paired_records(records: list[Record], data_cfg: DataConfig) -> list[Record]:
    """Records with the source as ``files[0]`` and the target in ``meta["target"]``: folder pairs as
    indexed, BraTS-layout cases with their two sequence files; a :class:`DataError` naming the
    missing file, or the folder CSV that lists no pairs."""
    out = []
    for r in records:
        if "target" in r.meta:  # a folder CSV pair
            out.append(r)
            continue
        if data_cfg.dataset == "folder":
            raise DataError(f"{data_cfg.labels_csv}: a translation study reads a CSV with 'source' and 'target' columns "
                            f"(one registered pair per row); this one lists single images ({r.files[0]})")
        case = Path(r.files[0]).parent
        files = [case / f"{case.name}-{seq}.nii.gz" for seq in (data_cfg.source_sequence, data_cfg.target_sequence)]
        for f in files:
            if not f.is_file():
                raise DataError(f"{f}: missing the translation study's sequence (data.source_sequence="
                                f"{data_cfg.source_sequence!r}, data.target_sequence={data_cfg.target_sequence!r})")
        out.append(replace(r, files=(str(files[0]),), meta={**r.meta, "target": str(files[1])}))
    return out


def paired_records_data(records: list[Record], data_cfg: DataConfig, cfg: ExperimentConfig, *,
                        train: bool) -> PairedVolumeDataset:
    """Records as aligned (target, label, source) examples."""
    return PairedVolumeDataset(paired_records(records, data_cfg), data_cfg, spatial_dims=cfg.model.spatial_dims,
                               train=train)


def build_paired_dataset(cfg: ExperimentConfig) -> PackedSource:
    """The config's whole paired data (centralized training), packed as ``cat([target, source])``."""
    d = cfg.data
    if d.dataset == "phantoms":
        data: Dataset = phantom_pairs_data(cfg, range(d.num_samples), seed=d.seed, lesion_fraction=d.lesion_fraction)
    else:
        data = paired_records_data(index_dataset(d).records, d, cfg, train=True)
    return PackedSource(data)
