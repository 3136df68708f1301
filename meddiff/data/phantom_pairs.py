"""Paired phantoms for cross-modality translation: one subject seen in two contrasts.

A pair is one anatomy draw (:func:`meddiff.data.phantom_anatomy.draw_anatomy`) rendered in a source
and a target contrast (``t1``, ``t2``, ``ct``), so both images and the masks share every pixel of
anatomy. MR contrasts get the MR scanner effects (:class:`meddiff.data.phantoms.Acquisition`, in
[0, 1]); CT gets a CT scan (:class:`CTScan`: resolution, blur and Gaussian quantum noise, in
Hounsfield units, never normalised). The source of a ``t1`` pair is exactly the image
:func:`meddiff.data.phantoms.make_phantoms` gives for the same seed and index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from meddiff.data.phantom_anatomy import CONTRASTS, HU_CONTRASTS, MASK_CHANNELS, draw_anatomy
from meddiff.data.phantoms import DEFAULT_ACQUISITION, Acquisition, apply_acquisition, degrade_resolution
from meddiff.data.transforms import hu_window


@dataclass(frozen=True)
class CTScan:
    """CT scanner effects, in HU: Gaussian quantum noise of ``noise_hu`` (brain soft-tissue noise
    of clinical head CT is a few HU), blur and acquired ``resolution`` as in
    :class:`meddiff.data.phantoms.Acquisition`. Bias fields and gamma are MR effects and do not apply."""

    noise_hu: float = 4.0
    blur_sigma: float = 0.3
    resolution: float = 1.0

    def __post_init__(self):
        if not (0.0 <= self.noise_hu <= 200.0 and 0.0 <= self.blur_sigma <= 10.0 and 0.1 <= self.resolution <= 1.0):
            raise ValueError(f"CTScan out of range: noise_hu={self.noise_hu} (0..200), blur_sigma={self.blur_sigma} "
                             f"(0..10), resolution={self.resolution} (0.1..1)")


DEFAULT_CT_SCAN = CTScan()

#: The range a 12-bit CT scanner stores, in HU.
CT_RANGE_HU = (-1024.0, 3071.0)


def apply_ct_scan(img: np.ndarray, scan: CTScan, rng: np.random.Generator) -> np.ndarray:
    """Apply CT scanner effects to a clean ``[H, W]`` slice in HU; returns ``[H, W]`` float32 HU
    within :data:`CT_RANGE_HU`."""
    out = degrade_resolution(img.astype(np.float64), resolution=scan.resolution, blur_sigma=scan.blur_sigma)
    if scan.noise_hu > 0:
        out = out + rng.normal(0.0, scan.noise_hu, size=out.shape)
    return np.clip(out, *CT_RANGE_HU).astype(np.float32)


class PhantomPairs(NamedTuple):
    """Aligned pairs: ``source`` and ``target`` ``[N, H, W]`` float32 (MR in [0, 1], CT in HU),
    ``labels [N]`` int64 (1 = tumour), ``masks [N, len(MASK_CHANNELS), H, W]`` uint8 and
    ``tissues [N, H, W]`` uint8 (indices into :data:`meddiff.data.phantom_anatomy.TISSUES`)."""

    source: np.ndarray
    target: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    tissues: np.ndarray


def _scanned(img: np.ndarray, contrast: str, acquisition: Acquisition, ct_scan: CTScan, rng) -> np.ndarray:
    if contrast in HU_CONTRASTS:
        return apply_ct_scan(img, ct_scan, rng)
    return apply_acquisition(img, acquisition, rng)


def make_phantom_pairs(num: int, size: int, *, seed: int = 0, source: str = "t1", target: str = "t2",
                       lesion_fraction: float = 0.5, acquisition: Acquisition = DEFAULT_ACQUISITION,
                       ct_scan: CTScan = DEFAULT_CT_SCAN, start: int = 0) -> PhantomPairs:
    """Pairs ``start .. start+num-1`` of the stream defined by ``seed``, in ``source`` and ``target``
    contrasts (see :class:`PhantomPairs`).

    Pair ``i`` depends only on ``(seed, i)`` and the scanners. The source's scanner noise comes from
    the anatomy's generator, as in :func:`meddiff.data.phantoms.make_phantoms` (so a ``t1`` source
    is that function's image), the target's from its own stream ``(seed, i, 1)``. Both MR contrasts
    of a pair share ``acquisition`` (one session: same bias field and gamma).
    """
    for name, contrast in (("source", source), ("target", target)):
        if contrast not in CONTRASTS:
            raise ValueError(f"{name} contrast {contrast!r} is unknown; choose one of {sorted(CONTRASTS)}")
    if source == target:
        raise ValueError(f"source and target contrasts must differ, got {source!r} twice")
    if num < 0 or size < 4:
        raise ValueError(f"need num >= 0 and size >= 4, got num={num}, size={size}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
    out = PhantomPairs(np.empty((num, size, size), np.float32), np.empty((num, size, size), np.float32),
                       np.empty((num,), np.int64), np.empty((num, len(MASK_CHANNELS), size, size), np.uint8),
                       np.empty((num, size, size), np.uint8))
    for j in range(num):
        rng = np.random.default_rng([seed, start + j])
        lesion = bool(rng.random() < lesion_fraction)
        anatomy = draw_anatomy(size, rng, lesion=lesion)
        out.source[j] = _scanned(anatomy.render(source), source, acquisition, ct_scan, rng)
        target_rng = np.random.default_rng([seed, start + j, 1])
        out.target[j] = _scanned(anatomy.render(target), target, acquisition, ct_scan, target_rng)
        out.labels[j], out.masks[j], out.tissues[j] = int(lesion), anatomy.masks(), anatomy.tissues()
    return out


def _to_model_range(images: np.ndarray, contrast: str, ct_window: tuple[float, float] | None) -> torch.Tensor:
    """``[N, H, W]`` to ``[N, 1, H, W]``: MR [0, 1] to [-1, 1]; CT kept in HU, or through
    ``ct_window`` (center, width) to [-1, 1]."""
    x = torch.from_numpy(images).unsqueeze(1)
    if contrast not in HU_CONTRASTS:
        return x.mul(2.0).sub(1.0)
    if ct_window is None:
        return x
    return torch.as_tensor(np.asarray(hu_window(x, center=ct_window[0], width=ct_window[1])), dtype=torch.float32)


class PairedPhantomDataset(Dataset):
    """Paired phantoms as ``(source [1, H, W], target [1, H, W], label int64)`` float32 tuples; with
    ``with_masks``, ``(source, target, label, mask [len(MASK_CHANNELS), H, W] uint8)``.

    MR contrasts are in [-1, 1] (as :class:`meddiff.data.phantoms.PhantomDataset`); CT stays in HU
    unless ``ct_window=(center, width)`` maps it to [-1, 1]
    (:func:`meddiff.data.transforms.hu_window`).
    """

    def __init__(self, num_samples: int, image_size: int, *, seed: int = 0, source: str = "t1", target: str = "t2",
                 lesion_fraction: float = 0.5, acquisition: Acquisition = DEFAULT_ACQUISITION,
                 ct_scan: CTScan = DEFAULT_CT_SCAN, ct_window: tuple[float, float] | None = None,
                 with_masks: bool = False):
        pairs = make_phantom_pairs(num_samples, image_size, seed=seed, source=source, target=target,
                                   lesion_fraction=lesion_fraction, acquisition=acquisition, ct_scan=ct_scan)
        self.source = _to_model_range(pairs.source, source, ct_window)
        self.target = _to_model_range(pairs.target, target, ct_window)
        self.labels = torch.from_numpy(pairs.labels)
        self.masks = torch.from_numpy(pairs.masks) if with_masks else None
        self.mask_channels = MASK_CHANNELS if with_masks else ()
        self.contrasts = (source, target)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.masks is not None:
            return self.source[i], self.target[i], self.labels[i], self.masks[i]
        return self.source[i], self.target[i], self.labels[i]
