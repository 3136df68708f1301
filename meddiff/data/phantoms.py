"""Procedural 2-D brain-MRI-like slices: the embedded default dataset (no download needed).

Each phantom is an axial T1-weighted-looking slice built from nested anatomical regions in head
coordinates: scalp, skull, subarachnoid CSF, a folded cortical grey-matter ribbon, white matter,
deep grey nuclei, lateral ventricles and the falx. Shape parameters vary per subject (head size and
aspect, pose, ventricle size, cortical folding). An optional tumour (enhancing rim, necrotic core,
oedema) is the class label; its sub-regions and the brain are available as masks aligned with the
image (:data:`MASK_CHANNELS`). Scanner effects (:class:`Acquisition`) are applied last, so a simulated
site can have its own scanner.

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

# T1-like tissue intensities in [0, 1].
_T1 = {"scalp": 0.72, "bone": 0.06, "csf": 0.16, "gm": 0.50, "wm": 0.82, "deep_gm": 0.60, "falx": 0.30}


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


def _ellipse(x, y, cx, cy, ax, ay, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / ax) ** 2 + (v / ay) ** 2


def _smooth_texture(rng, n, scale):
    noise = rng.standard_normal((n, n))
    tex = ndimage.gaussian_filter(noise, sigma=n / 16.0)
    return scale * tex / (tex.std() + 1e-8)


def _head_frame(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> dict:
    """Subject pose and head shape: rotated coordinates ``xr, yr``, the head's semi-axes ``ax, ay``,
    the normalised radius ``r`` (1 at the scalp) and the polar angle ``phi``."""
    angle = rng.uniform(-0.15, 0.15)
    cx, cy = rng.uniform(-0.04, 0.04, size=2)
    c, s = np.cos(angle), np.sin(angle)
    xr, yr = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)
    ax, ay = rng.uniform(0.70, 0.80), rng.uniform(0.84, 0.94)
    return {"xr": xr, "yr": yr, "ax": ax, "ay": ay, "r": np.sqrt((xr / ax) ** 2 + (yr / ay) ** 2),
            "phi": np.arctan2(yr / ay, xr / ax)}


def _anatomy(head: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """T1 intensities of scalp, skull, CSF, folded cortex, white matter, deep grey nuclei,
    ventricles and falx; returns ``(image, brain mask)``, both ``[n, n]``."""
    xr, yr, r, phi = head["xr"], head["yr"], head["r"], head["phi"]
    # Folded cortex: the grey/white boundary and the pial surface wobble with the polar angle.
    k = np.arange(5, 13)
    amp = rng.uniform(0.0, 0.035, size=k.size)
    phase = rng.uniform(0, 2 * np.pi, size=k.size)
    folds = (amp[:, None, None] * np.cos(k[:, None, None] * phi[None] + phase[:, None, None])).sum(0)
    cortex = rng.uniform(0.10, 0.15)
    pial = 0.83 + 0.3 * folds
    wm_edge = pial - cortex + 1.2 * folds

    img = np.zeros(r.shape)
    img[r <= 1.0] = _T1["scalp"]
    img[r <= 0.93] = _T1["bone"]
    img[r <= 0.87] = _T1["csf"]
    img[r <= pial] = _T1["gm"]
    img[r <= wm_edge] = _T1["wm"]
    for side in (-1, 1):  # deep grey nuclei (thalamus / basal ganglia)
        img[_ellipse(xr, yr, side * 0.20, 0.08, 0.10, 0.15, side * 0.3) <= 1] = _T1["deep_gm"]
    # Lateral ventricles: paired, slightly splayed, size varies with the subject (age, atrophy).
    vs = rng.uniform(0.7, 1.4)
    vy = rng.uniform(-0.12, -0.02)
    for side in (-1, 1):
        img[_ellipse(xr, yr, side * 0.075 * vs, vy, 0.055 * vs, 0.24 * vs, -side * 0.25) <= 1] = _T1["csf"]
    # Falx cerebri: a thin midline line outside the ventricles.
    brain = r <= pial
    falx = (np.abs(xr) < 0.012) & brain & ((yr < vy - 0.26 * vs) | (yr > vy + 0.30 * vs))
    img[falx] = _T1["falx"]
    return img, brain


#: Mask channels of a phantom: the brain, then the tumour sub-regions in BraTS order (necrotic core
#: = BraTS label 1, oedema = 2, enhancing tumour = 3); the sub-regions are disjoint.
MASK_CHANNELS = ("brain", "necrotic", "oedema", "enhancing")


def _draw_tumour(img: np.ndarray, brain: np.ndarray, head: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A tumour inside the brain parenchyma, in place: oedema, enhancing rim, necrotic core.
    Returns the three sub-region masks (boolean, ``img``'s shape)."""
    xr, yr, ax, ay = head["xr"], head["yr"], head["ax"], head["ay"]
    for _ in range(20):
        lr, la = rng.uniform(0.15, 0.55), rng.uniform(0, 2 * np.pi)
        lx, ly = lr * np.cos(la) * ax, lr * np.sin(la) * ay
        if abs(lx) > 0.12:
            break
    radius = rng.uniform(0.08, 0.17)
    d = np.sqrt((xr - lx) ** 2 + (yr - ly) ** 2)
    theta = np.arctan2(yr - ly, xr - lx)
    wobble = 1 + 0.15 * np.cos(3 * theta + rng.uniform(0, 6.3)) + 0.08 * np.cos(5 * theta + rng.uniform(0, 6.3))
    rr = d / (radius * wobble)
    inside = brain & (rr <= 1.7)
    oedema, tumour = inside & (rr > 1.0), brain & (rr <= 1.0)
    necrotic = brain & (rr <= rng.uniform(0.45, 0.7))
    img[oedema] *= 0.72  # oedema: T1-hypointense
    img[tumour] = 0.97  # enhancing rim
    img[necrotic] = 0.25  # necrotic core
    return {"necrotic": necrotic, "oedema": oedema, "enhancing": tumour & ~necrotic}


def _majority(masks: list[np.ndarray], size: int, supersample: int) -> np.ndarray:
    """Disjoint supersampled boolean regions ``[n, n]`` to ``[len(masks), size, size]``: each pixel
    takes the region (or the background) that covers most of its sub-pixels, so the regions stay
    disjoint (the label counterpart of the image's box average)."""
    fractions = np.stack([m.reshape(size, supersample, size, supersample).mean(axis=(1, 3)) for m in masks])
    winner = np.argmax(np.concatenate([1.0 - fractions.sum(0, keepdims=True), fractions]), axis=0)
    return winner[None] == np.arange(1, len(masks) + 1)[:, None, None]


def phantom_slice(size: int, rng: np.random.Generator, *, lesion: bool, supersample: int = 2,
                  masks: bool = False):
    """One clean phantom slice.

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
    n = size * supersample
    lin = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    y, x = np.meshgrid(lin, lin, indexing="ij")
    head = _head_frame(x, y, rng)
    img, brain = _anatomy(head, rng)
    img = img + brain * _smooth_texture(rng, n, 0.02)  # low-frequency tissue texture, brain only
    regions = _draw_tumour(img, brain, head, rng) if lesion else {}
    img = np.clip(img.reshape(size, supersample, size, supersample).mean(axis=(1, 3)), 0.0, 1.0).astype(np.float32)
    if not masks:
        return img
    empty = np.zeros((size * supersample,) * 2, bool)
    tumour = _majority([regions.get(c, empty) for c in MASK_CHANNELS[1:]], size, supersample)
    return img, np.concatenate([_majority([brain], size, supersample), tumour]).astype(np.uint8)


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
    if acq.resolution < 1.0:
        small = ndimage.zoom(out, acq.resolution, order=1)
        out = ndimage.zoom(small, (h / small.shape[0], w / small.shape[1]), order=1)
    if acq.blur_sigma > 0:
        out = ndimage.gaussian_filter(out, acq.blur_sigma)
    if acq.noise_level > 0:
        sigma = acq.noise_level * _T1["wm"]
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
