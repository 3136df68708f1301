"""Pseudo-patient volumes from one template NIfTI (e.g. the MNI152 T1 brain), in BraTS layout.

Each pseudo-patient is the template seen through its own anatomy and scan: a random global affine
(scale, rotation, shift), a smooth random displacement field (elastic variation), an intensity
gamma and gain, and, for a share of the cohort, a synthetic tumour (enhancing rim, necrotic core,
surrounding oedema) with its segmentation. The cohort is written as
``BraTS-GLI-xxxxx-000/BraTS-GLI-xxxxx-000-{t1n,t1c,seg}.nii.gz`` at the requested spacing with a
RAS affine, so the real BraTS adapter, resampling, patient-level splits and per-site scanner shift
all apply to it unchanged.

Hand-written because no library makes a labelled multi-subject cohort out of a single template;
it lets 3-D latent diffusion be developed and tested on real brain anatomy without a data
download (the template itself is read from disk, never fetched). Deterministic in ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

from meddiff.data.readers import Volume, read_nifti


@dataclass(frozen=True)
class Variation:
    """Per-patient variation of the template (all in mm or dimensionless)."""

    scale: float = 0.06          # global scale jitter (fraction)
    rotation_deg: float = 5.0    # rotation jitter per axis
    shift_mm: float = 4.0        # translation jitter
    elastic_mm: float = 3.0      # amplitude of the smooth displacement field
    elastic_grid: int = 5        # control points per axis of that field
    gamma: float = 0.12          # intensity gamma jitter
    gain: float = 0.08           # intensity gain jitter


def _rotation(angles: Sequence[float]) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def output_grid(template: Volume, spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """The output shape and RAS affine covering the template's field of view at ``spacing`` mm."""
    shape = np.array(template.array.shape)
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]).T
    world = (template.affine @ corners)[:3]
    lo, hi = world.min(1), world.max(1)
    out_shape = tuple(int(math.ceil((hi[i] - lo[i]) / spacing)) + 1 for i in range(3))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    return out_shape, affine


def pseudo_patient(template: Volume, *, spacing: float, seed: int, lesion: bool,
                   variation: Variation = Variation()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pseudo-patient: ``(t1n [X, Y, Z], t1c [X, Y, Z], seg [X, Y, Z] uint8, affine [4, 4])``.

    Intensities keep the template's range; ``seg`` is 1 (necrotic core), 2 (oedema) and 3
    (enhancing rim), BraTS's labels, and all 0 without a lesion.
    """
    rng = np.random.default_rng([seed, 2024])
    shape, out_affine = output_grid(template, spacing)
    v = variation
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = out_affine[:3, :3] @ idx + out_affine[:3, 3:4]
    centre = world.mean(1, keepdims=True)
    rot = _rotation(np.deg2rad(rng.uniform(-v.rotation_deg, v.rotation_deg, 3)))
    scale = 1.0 + rng.uniform(-v.scale, v.scale, 3)
    shift = rng.uniform(-v.shift_mm, v.shift_mm, (3, 1))
    # inverse map: output world -> template world
    src = rot.T @ ((world - centre - shift) / scale[:, None]) + centre
    if v.elastic_mm > 0:
        coarse = rng.normal(0.0, 1.0, (3, v.elastic_grid, v.elastic_grid, v.elastic_grid))
        field = np.stack([ndimage.zoom(c, [s / v.elastic_grid for s in shape], order=3)[: shape[0], : shape[1], : shape[2]]
                          for c in coarse])
        field *= v.elastic_mm / max(np.abs(field).max(), 1e-6)
        src = src + field.reshape(3, -1)
    vox = np.linalg.inv(template.affine) @ np.vstack([src, np.ones((1, src.shape[1]))])
    image = ndimage.map_coordinates(template.array, vox[:3], order=1, mode="constant", cval=0.0).reshape(shape)
    peak = float(np.percentile(template.array, 99.5)) or 1.0
    norm = np.clip(image / peak, 0.0, None)
    norm = norm ** (1.0 + rng.uniform(-v.gamma, v.gamma)) * (1.0 + rng.uniform(-v.gain, v.gain))
    t1n = (norm * peak).astype(np.float32)
    t1c = t1n.copy()
    seg = np.zeros(shape, np.uint8)
    if lesion:
        t1n, t1c, seg = _add_tumour(t1n, t1c, seg, rng, spacing=spacing, peak=peak)
    return t1n, t1c, seg, out_affine


def _add_tumour(t1n, t1c, seg, rng, *, spacing: float, peak: float):
    """A ring-enhancing ellipsoid inside the brain: core (1), oedema (2), enhancing rim (3)."""
    brain = t1n > 0.55 * peak
    brain = ndimage.binary_erosion(brain, iterations=max(1, int(round(6.0 / spacing))))
    candidates = np.argwhere(brain)
    if len(candidates) == 0:
        candidates = np.argwhere(t1n > 0.3 * peak)
    if len(candidates) == 0:
        return t1n, t1c, seg
    c = candidates[rng.integers(len(candidates))]
    radii = rng.uniform(7.0, 15.0, 3) / spacing  # mm -> voxels
    grid = np.indices(t1n.shape, dtype=np.float64)
    r = np.sqrt(sum(((grid[i] - c[i]) / max(radii[i], 0.75)) ** 2 for i in range(3)))
    core, rim, oedema = r < 0.6, (r >= 0.6) & (r < 1.0), (r >= 1.0) & (r < 1.6) & (t1n > 0.2 * peak)
    seg[oedema], seg[rim], seg[core] = 2, 3, 1
    for img in (t1n, t1c):
        img[oedema] *= 0.85
        img[core] = 0.25 * peak
        img[rim] *= 0.9
    t1c[rim] = 1.1 * peak  # contrast enhancement of the rim
    return t1n, t1c, seg


def write_template_cohort(template_path: str | Path, out_dir: str | Path, *, num_patients: int, spacing: float = 2.0,
                          lesion_fraction: float = 0.5, seed: int = 0, variation: Variation = Variation()) -> list[Path]:
    """Write ``num_patients`` pseudo-patients of ``template_path`` in BraTS layout; returns the case folders."""
    import nibabel as nib

    if num_patients < 1:
        raise ValueError(f"num_patients must be >= 1, got {num_patients}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
    if not spacing > 0:
        raise ValueError(f"spacing must be > 0 mm, got {spacing}")
    template = read_nifti(template_path)
    out_dir = Path(out_dir)
    cases = []
    lesions = np.random.default_rng([seed, 7]).random(num_patients) < lesion_fraction
    for i, (t1n, t1c, seg, affine) in enumerate(_cohort(template, num_patients, spacing, lesions, seed, variation)):
        name = f"BraTS-GLI-{i:05d}-000"
        case = out_dir / name
        case.mkdir(parents=True, exist_ok=True)
        for suffix, arr in (("t1n", t1n), ("t1c", t1c), ("seg", seg)):
            img = nib.Nifti1Image(arr, affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, str(case / f"{name}-{suffix}.nii.gz"))
        cases.append(case)
    return cases


def _cohort(template: Volume, n: int, spacing: float, lesions: np.ndarray, seed: int, variation: Variation) -> Iterator:
    for i in range(n):
        yield pseudo_patient(template, spacing=spacing, seed=seed * 100_003 + i, lesion=bool(lesions[i]), variation=variation)
