"""Pseudo-patient volumes from one template NIfTI (e.g. the MNI152 T1 brain), in BraTS layout.

Each pseudo-patient is the template seen through its own anatomy and scan: a random global affine
(scale, rotation, shift), a smooth random displacement field (elastic variation), an intensity
gamma and gain, and, for a share of the cohort, a synthetic tumour (enhancing rim, necrotic core,
surrounding oedema) with its segmentation. The cohort is written as
``BraTS-GLI-xxxxx-000/BraTS-GLI-xxxxx-000-{t1n,t1c,seg}.nii.gz`` at the requested spacing with a
RAS affine, so the real BraTS adapter, resampling, patient-level splits and per-site scanner shift
all apply to it unchanged. Optionally a second sequence, ``-t2w.nii.gz``, is derived from tissue
classes of the T1 (:func:`t2_from_t1`), giving T1/T2 pairs on one grid for translation.

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

from meddiff.data.phantom_anatomy import CONTRASTS
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
                   variation: Variation = Variation(), t2w: bool = False) -> tuple[np.ndarray, ...]:
    """One pseudo-patient: ``(t1n [X, Y, Z], t1c [X, Y, Z], seg [X, Y, Z] uint8, affine [4, 4])``,
    and with ``t2w`` a T2-like ``t2w [X, Y, Z]`` last (:func:`t2_from_t1`; the others unchanged).

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
    t2 = t2_from_t1(t1n, peak) if t2w else None  # from the healthy anatomy; draws nothing from rng
    t1c = t1n.copy()
    seg = np.zeros(shape, np.uint8)
    if lesion:
        t1n, t1c, seg = _add_tumour(t1n, t1c, seg, rng, spacing=spacing, peak=peak)
    if t2 is None:
        return t1n, t1c, seg, out_affine
    return t1n, t1c, seg, out_affine, _t2_tumour(t2, seg, peak)


def t2_from_t1(t1: np.ndarray, peak: float) -> np.ndarray:
    """A T2-like volume ``[X, Y, Z]`` float32 (``peak`` = the T1's bright end) from tissue classes
    of a skull-stripped brain T1 such as the MNI152 template.

    The brain (T1 above 0.2 * peak) is split into three intensity classes by 1-D k-means (scipy
    ``kmeans2``, deterministic start at the 15th/50th/85th percentiles): CSF < grey < white matter on
    T1. Each class takes the phantoms' T2 intensity (:data:`meddiff.data.phantom_anatomy.CONTRASTS`:
    CSF bright, grey above white matter) times ``peak``; a voxel between two class centres (partial
    volume) mixes their T2 values linearly, one darker than the CSF centre is CSF down to 0.1 * peak
    and fades to the background below that (the brain's outer fringe).
    """
    from scipy.cluster.vq import kmeans2

    brain = t1[t1 > 0.2 * peak].astype(np.float64)
    if brain.size < 3:
        return np.zeros_like(t1, dtype=np.float32)
    start = np.percentile(brain, [15, 50, 85])[:, None]
    centres, _ = kmeans2(brain[:, None], start, minit="matrix", iter=30)
    centres = np.sort(centres.ravel()) + np.arange(3) * 1e-6  # strictly increasing, as np.interp needs
    t2 = CONTRASTS["t2"].tissue
    anchors = [0.0, t2["csf"] * peak, t2["csf"] * peak, t2["gm"] * peak, t2["wm"] * peak]
    return np.interp(t1, np.concatenate([[0.0, 0.1 * peak], centres]), anchors).astype(np.float32)


def _t2_tumour(t2: np.ndarray, seg: np.ndarray, peak: float) -> np.ndarray:
    """Paint BraTS labels on a T2-like volume as the phantoms' T2 contrast does: bright oedema (2)
    over its tissue, an intermediate enhancing rim (3), a bright fluid necrotic core (1)."""
    c = CONTRASTS["t2"]
    oedema = seg == 2
    t2[oedema] = t2[oedema] * c.oedema[0] + c.oedema[1] * peak
    t2[seg == 3] = c.enhancing * peak
    t2[seg == 1] = c.necrotic * peak
    return t2


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
                          lesion_fraction: float = 0.5, seed: int = 0, variation: Variation = Variation(),
                          t2w: bool = False) -> list[Path]:
    """Write ``num_patients`` pseudo-patients of ``template_path`` in BraTS layout (``t1n``, ``t1c``,
    ``seg``, and with ``t2w`` the T2-like ``t2w`` on the same grid and affine); returns the case folders."""
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
    for i, (t1n, t1c, seg, affine, *t2) in enumerate(_cohort(template, num_patients, spacing, lesions, seed, variation, t2w)):
        name = f"BraTS-GLI-{i:05d}-000"
        case = out_dir / name
        case.mkdir(parents=True, exist_ok=True)
        for suffix, arr in (("t1n", t1n), ("t1c", t1c), ("seg", seg), *(("t2w", a) for a in t2)):
            img = nib.Nifti1Image(arr, affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, str(case / f"{name}-{suffix}.nii.gz"))
        cases.append(case)
    return cases


def _cohort(template: Volume, n: int, spacing: float, lesions: np.ndarray, seed: int, variation: Variation,
            t2w: bool) -> Iterator:
    for i in range(n):
        yield pseudo_patient(template, spacing=spacing, seed=seed * 100_003 + i, lesion=bool(lesions[i]),
                             variation=variation, t2w=t2w)
