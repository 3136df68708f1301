"""One site's segmentation utility of the global mask-conditioned model, on the site's own data.

The protocol of ``meddiff evaluate --task segmentation`` (Med-DDPM's, Dorjsembe et al. 2024;
:func:`meddiff.evaluate.segmentation.segmentation_utility`) run where the data live: the site
generates ``evaluation.segmentation_samples`` images from the received model, each conditioned on
a mask (and label) of its own training split, trains the fixed segmenter recipe for
``evaluation.segmentation_steps`` steps on its real training pairs, on the synthetic pairs and on
both, and scores each on its own held-out pairs (at most ``evaluation.max_real``); mask fidelity
applies the real-only segmenter to the generated images against their masks. Only the report's
numbers leave the site.
"""

from __future__ import annotations

import time
from typing import Mapping, Optional

import torch
from torch.utils.data import Dataset

from configs import ExperimentConfig
from meddiff.data.phantoms import MASK_CHANNELS
from meddiff.evaluate.segmentation import SegmenterSettings, segmentation_utility
from meddiff.recipes.phases import denoiser_phase
from meddiff.recipes.sample import sample_images

Pairs = tuple[torch.Tensor, torch.Tensor]


def site_pairs(dataset: Dataset, cfg: ExperimentConfig, *, limit: Optional[int] = None,
               seed: int = 0) -> tuple[Pairs, torch.Tensor, tuple[str, ...]]:
    """``((images [N, 1, *S] in [-1, 1], masks [N, K, *S] in {0, 1}), labels [N], channel names)``
    of a mask study's site dataset, whose items are packed ``(cat([image, 2 * mask - 1]), label)``;
    ``limit`` keeps a seeded subset of that many items."""
    c, k = cfg.image_channels, cfg.model.cond_channels
    if not k:
        raise ValueError("segmentation needs (image, mask) pairs, but model.cond_channels is 0: the study has no masks")
    if c != 1:
        raise ValueError(f"the segmenter reads one image channel; model.in_channels is {c}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the site's dataset holds no (image, mask) pairs")
    order = range(n)
    if limit is not None and limit < n:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values.tolist()
    items = [dataset[i] for i in order]
    packed = torch.stack([x for x, _ in items]).float()
    if packed.shape[1] != c + k:
        raise ValueError(f"the site's examples have {packed.shape[1]} channels, not image + mask = {c} + {k} "
                         "(model.in_channels + model.cond_channels)")
    labels = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
    names = tuple(getattr(dataset, "mask_channels", ()) or MASK_CHANNELS[:k])
    return (packed[:, :c], packed[:, c:].gt(0).float()), labels, names


def synthetic_pairs(model: torch.nn.Module, cfg: ExperimentConfig, real: Pairs, labels: torch.Tensor, *, num: int,
                    seed: int, device: torch.device, batch: int = 64) -> Pairs:
    """``num`` generated ``(images [num, 1, *S], masks [num, K, *S])``: one image per real training
    mask (and its label, for a class-conditional model), the masks in a seeded order, cycled."""
    order = torch.randperm(len(real[1]), generator=torch.Generator().manual_seed(seed))
    pick = order[torch.arange(num) % len(order)]
    masks, ys = real[1][pick], labels[pick] if cfg.model.num_classes else None
    images = [sample_images(model, cfg, num=len(chunk), device=device, seed=seed + i, progress=False, masks=chunk,
                            y=None if ys is None else ys[i * batch:(i + 1) * batch]).cpu()
              for i, chunk in enumerate(masks.split(batch))]
    return torch.cat(images).float().clamp(-1.0, 1.0), masks


def site_segmentation(cfg: ExperimentConfig, weights: Mapping[str, torch.Tensor], train: Dataset, test: Dataset, *,
                      seed: int, device: str | torch.device = "cpu") -> dict:
    """The site's segmentation utility of the denoiser with ``weights`` (the server's EMA weights):
    :func:`segmentation_utility`'s report (``arms``, ``mask_fidelity``: ``{region: {"dice", "cases"}}``;
    counts; settings) plus ``seconds``. ``train`` and ``test`` are the site's packed datasets."""
    ev, start, device = cfg.evaluation, time.perf_counter(), torch.device(device)
    seed %= 2**31  # room for the per-batch offsets of the sampling seeds
    if ev.segmentation_steps < 1:
        raise ValueError("evaluation.segmentation_steps is 0: the per-site segmentation evaluation is off")
    real_train, labels, names = site_pairs(train, cfg)
    real_test, _, _ = site_pairs(test, cfg, limit=ev.max_real, seed=seed)
    model = denoiser_phase(cfg).build_model(cfg)
    model.load_state_dict(dict(weights))
    synthetic = synthetic_pairs(model.to(device).eval(), cfg, real_train, labels, num=ev.segmentation_samples, seed=seed,
                                device=device)
    report, _ = segmentation_utility(real_train, synthetic, real_test, channel_names=names, device=device,
                                     settings=SegmenterSettings(steps=ev.segmentation_steps, seed=seed))
    report["seconds"] = time.perf_counter() - start
    return report
