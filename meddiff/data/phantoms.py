"""Procedural 2-D brain-MRI-like slices: the embedded default dataset (no download needed).

Each phantom is an axial T1-weighted-looking slice built from nested anatomical regions in head
coordinates: scalp, skull, subarachnoid CSF, a folded cortical grey-matter ribbon, white matter,
deep grey nuclei, lateral ventricles and the falx. Shape parameters vary per subject (head size and
aspect, pose, ventricle size, cortical folding). An optional tumour (enhancing rim, necrotic core,
oedema) is the class label; its sub-regions and the brain are available as masks aligned with the
image (:data:`MASK_CHANNELS`). Scanner effects (:class:`Acquisition`) are applied last, so a simulated
site can have its own scanner. The anatomy is drawn once as a tissue label map
(:mod:`meddiff.data.phantom_anatomy`), which also renders T2-like and CT contrasts of the same subject
(:mod:`meddiff.data.phantom_pairs`).

Hand-written because no library produces labelled, anatomically structured 2-D slices with
controllable acquisition effects; the Shepp-Logan phantom (skimage) has no variation or labels.
Generation is deterministic in ``(seed, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from meddiff.data.phantom_anatomy import CONTRASTS, MASK_CHANNELS, draw_anatomy


@dataclass(frozen=True)
class Acquisition:
    """Scanner effects applied to a clean phantom.

    Attributes:
        bias_field: strength of a smooth multiplicative field ``exp(b * p(x, y))`` (0 = none, 0.3 strong).
        noise_level: Rician noise sigma, relative to the white-matter intensity.
        contrast_gamma: intensity gamma (1 = unchanged; < 1 brightens mid-tones).
        blur_sigma: Gaussian blur sigma in output pixels.
        resolution: fraction of the output resolution actually acquired (1 = full; 0.5 = half,
            then interpolated back).
        bias_seed: seed of the bias field's shape, so one site keeps one field.
    """

    bias_field: float = 0.0
    noise_level: float = 0.0
    contrast_gamma: float = 1.0
    blur_sigma: float = 0.0
    resolution: float = 1.0
    bias_seed: int = 0

    def __post_init__(self):
        checks = {
            "bias_field": 0.0 <= self.bias_field <= 2.0,
            "noise_level": 0.0 <= self.noise_level <= 1.0,
            "contrast_gamma": 0.1 <= self.contrast_gamma <= 10.0,
            "blur_sigma": 0.0 <= self.blur_sigma <= 10.0,
            "resolution": 0.1 <= self.resolution <= 1.0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"Acquisition field(s) out of range: {', '.join(f'{k}={getattr(self, k)}' for k in bad)}")


def site_acquisition(site: int, seed: int) -> Acquisition:
    """A deterministic, site-specific scanner: contrast gamma, bias field, noise, blur and resolution.

    The ranges are those of clinical scanners seen at training resolution: the coarsest site
    acquires at 3/4 of the grid (a 0.5 factor leaves 16 pixels of a 32-pixel slice, where the skull
    and ventricles vanish) and the blur stays below 0.6 pixels.
    """
    rng = np.random.default_rng([seed, 11, site])
    return Acquisition(
        contrast_gamma=float(rng.uniform(0.75, 1.3)),
        bias_field=float(rng.uniform(0.05, 0.3)),
        noise_level=float(rng.uniform(0.01, 0.06)),
        blur_sigma=float(rng.uniform(0.0, 0.6)),
        resolution=float(rng.choice([1.0, 1.0, 0.75, 0.75])),
        bias_seed=int(rng.integers(0, 2**31 - 1)),
    )


DEFAULT_ACQUISITION = Acquisition(bias_field=0.1, noise_level=0.02, blur_sigma=0.3)


def phantom_slice(size: int, rng: np.random.Generator, *, lesion: bool, supersample: int = 2,
                  masks: bool = False):
    """One clean T1-weighted phantom slice (:func:`meddiff.data.phantom_anatomy.draw_anatomy`
    rendered in ``t1``).

    Args:
        size: output side length in pixels.
        rng: the source of all anatomical variation.
        lesion: whether to draw a tumour.
        supersample: geometry is drawn at ``supersample * size`` and box-averaged (anti-aliasing).
        masks: also return the region masks (the image is the same either way).
    Returns:
        ``[size, size]`` float32 array in [0, 1]; rows run anterior to posterior. With ``masks``:
        ``(image, masks [len(MASK_CHANNELS), size, size] uint8 in {0, 1})``.
    """
    anatomy = draw_anatomy(size, rng, lesion=lesion, supersample=supersample)
    img = anatomy.render("t1")
    return (img, anatomy.masks()) if masks else img


def degrade_resolution(img: np.ndarray, *, resolution: float, blur_sigma: float) -> np.ndarray:
    """Acquire ``[H, W]`` at ``resolution`` of the grid (then interpolate back) and blur it by
    ``blur_sigma`` pixels; any intensity units."""
    h, w = img.shape
    if resolution < 1.0:
        small = ndimage.zoom(img, resolution, order=1)
        img = ndimage.zoom(small, (h / small.shape[0], w / small.shape[1]), order=1)
    if blur_sigma > 0:
        img = ndimage.gaussian_filter(img, blur_sigma)
    return img


def apply_acquisition(img: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Apply scanner effects to a clean ``[H, W]`` slice in [0, 1]; returns ``[H, W]`` in [0, 1]."""
    out = img.astype(np.float64)
    h, w = out.shape
    if acq.contrast_gamma != 1.0:
        out = out ** acq.contrast_gamma
    if acq.bias_field > 0:
        brng = np.random.default_rng(acq.bias_seed)
        yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
        coef = brng.normal(size=6)
        poly = coef[0] * xx + coef[1] * yy + coef[2] * xx * yy + coef[3] * xx**2 + coef[4] * yy**2 + coef[5] * xx**2 * yy
        poly = poly / (np.abs(poly).max() + 1e-8)
        out = out * np.exp(acq.bias_field * poly)
    out = degrade_resolution(out, resolution=acq.resolution, blur_sigma=acq.blur_sigma)
    if acq.noise_level > 0:
        sigma = acq.noise_level * CONTRASTS["t1"].tissue["wm"]
        n1, n2 = rng.normal(0, sigma, size=(2, h, w))
        out = np.sqrt((out + n1) ** 2 + n2**2)  # Rician magnitude noise
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def make_phantoms(
    num: int,
    size: int,
    *,
    seed: int = 0,
    lesion_fraction: float = 0.5,
    acquisition: Acquisition = DEFAULT_ACQUISITION,
    start: int = 0,
    masks: bool = False,
) -> tuple[np.ndarray, ...]:
    """Generate phantoms ``start .. start+num-1`` of the stream defined by ``seed``.

    Phantom ``i`` depends only on ``(seed, i)`` (and the acquisition), so any slice of the stream
    is reproducible on its own; asking for ``masks`` changes no image.

    Returns:
        ``images [num, size, size]`` float32 in [0, 1] and ``labels [num]`` int64 (1 = tumour);
        with ``masks`` also ``masks [num, len(MASK_CHANNELS), size, size]`` uint8 (the scanner
        effects do not move anatomy, so the clean slice's masks stay aligned).
    """
    if num < 0 or size < 4:
        raise ValueError(f"need num >= 0 and size >= 4, got num={num}, size={size}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
    images = np.empty((num, size, size), dtype=np.float32)
    labels = np.empty((num,), dtype=np.int64)
    regions = np.zeros((num, len(MASK_CHANNELS), size, size), dtype=np.uint8)
    for j in range(num):
        rng = np.random.default_rng([seed, start + j])
        lesion = bool(rng.random() < lesion_fraction)
        clean = phantom_slice(size, rng, lesion=lesion, masks=masks)
        if masks:
            clean, regions[j] = clean
        images[j] = apply_acquisition(clean, acquisition, rng)
        labels[j] = int(lesion)
    return (images, labels, regions) if masks else (images, labels)


class PhantomDataset(Dataset):
    """Phantom slices as ``(image [1, H, W] float32 in [-1, 1], label int64)`` tuples; with
    ``with_masks``, ``(image, label, mask [len(MASK_CHANNELS), H, W] uint8)`` triples."""

    def __init__(
        self,
        num_samples: int,
        image_size: int,
        *,
        seed: int = 0,
        lesion_fraction: float = 0.5,
        acquisition: Acquisition = DEFAULT_ACQUISITION,
        with_masks: bool = False,
    ):
        made = make_phantoms(num_samples, image_size, seed=seed, lesion_fraction=lesion_fraction,
                             acquisition=acquisition, masks=with_masks)
        self.images = torch.from_numpy(made[0]).unsqueeze(1).mul_(2.0).sub_(1.0)
        self.labels = torch.from_numpy(made[1])
        self.masks = torch.from_numpy(made[2]) if with_masks else None
        self.mask_channels = MASK_CHANNELS if with_masks else ()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.masks is not None:
            return self.images[i], self.labels[i], self.masks[i]
        return self.images[i], self.labels[i]
