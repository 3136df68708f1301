"""Federated FID without pooling images: sites share feature statistics, the server merges them.

Each site encodes its real held-out images and sends only ``(count, mean [D], covariance [D, D])``
(:class:`~meddiff.evaluate.metrics.FeatureStats`). The server merges them exactly (pairwise
update of Chan, Golub & LeVeque 1979) into the statistics of the union, and computes the FID of
the generated set against all sites' data, plus one FID per site, which shows which sites the
global model underserves. No image leaves a site.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from meddiff.evaluate.encoders import Encoder
from meddiff.evaluate.metrics import FeatureStats, fid_from_stats, merge_stats


def subset_indices(size: int, max_examples: int | None = None, *, seed: int = 0) -> list[int]:
    """All indices, or a seeded random sorted subset of ``max_examples`` (never simply the first
    ones: dataset files are often sorted by label, PneumoniaMNIST's training split among them)."""
    if max_examples is None or max_examples >= size:
        return list(range(size))
    return sorted(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:max_examples].tolist())


def dataset_images(dataset: Dataset, max_examples: int | None = None, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, C, *S]`` and labels ``[N]`` at :func:`subset_indices` of a dataset."""
    indices = subset_indices(len(dataset), max_examples, seed=seed)
    xs, ys = [], []
    for x, y in DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=256):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    if not xs:
        raise ValueError("the dataset is empty")
    return torch.cat(xs), torch.cat(ys)


def site_feature_stats(encoder: Encoder, dataset: Dataset, max_examples: int | None = None, *,
                       image_channels: int | None = None) -> FeatureStats:
    """What a site sends: the statistics of its real images' features (no images). ``image_channels``:
    the leading channels that are the image (the rest, e.g. a packed mask, is not encoded)."""
    images, _ = dataset_images(dataset, max_examples)
    return FeatureStats.of(encoder.encode(images[:, :image_channels]))


def federated_fid(generated: np.ndarray, site_stats: Mapping[str, FeatureStats]) -> dict:
    """Global FID (generated features ``[G, D]`` against the merged site statistics) and per-site FIDs."""
    gen = FeatureStats.of(generated)
    merged = merge_stats(list(site_stats.values()))
    return {"fid_global": fid_from_stats(gen, merged), "real_count": merged.count,
            "fid_per_site": {name: fid_from_stats(gen, s) for name, s in site_stats.items()}}
