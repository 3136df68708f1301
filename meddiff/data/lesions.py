"""Rule-based tumour masks to generate from when no real mask bank exists: a brain, then a tumour
of a chosen size placed inside it, with nested sub-regions.

The channels are the phantoms' (:data:`~meddiff.data.phantoms.MASK_CHANNELS`): brain, necrotic
core, oedema, enhancing tumour, following the BraTS glioma sub-regions (Menze et al. 2015, "The
Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)", IEEE TMI): a necrotic core inside an
enhancing rim (together the tumour core), surrounded by an oedema halo (with the core, the whole
tumour). Here each is a ball around one centre, ``d`` the distance to it in pixels (voxels):

- necrotic: ``d <= f_n r`` with ``f_n ~ U(0.3, 0.6)``;
- enhancing: ``f_n r < d <= r``, with the tumour radius ``r ~ U(r_min, r_max)``;
- oedema: ``r < d <= f_o r`` with ``f_o ~ U(1.3, 1.8)``, cut to the brain.

The centre is drawn among brain pixels at least ``f_o r`` from the brain's edge (so the whole
tumour fits), else at least ``r`` (the oedema is then cut), so the tumour core always lies inside
the brain. 2-D and 3-D; everything comes from one seeded generator.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from meddiff.data.phantoms import MASK_CHANNELS


def ellipse_brain(size: int, spatial_dims: int, rng: np.random.Generator) -> np.ndarray:
    """An elliptical (ellipsoidal) brain ``[size] * spatial_dims`` bool, semi-axes 70-94% of the
    half side, its centre within 4% of the middle (the phantoms' head shape)."""
    lin = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    grids = np.meshgrid(*([lin] * spatial_dims), indexing="ij")
    axes = rng.uniform(0.70, 0.94, size=spatial_dims)
    centre = rng.uniform(-0.04, 0.04, size=spatial_dims)
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, axes)) <= 1.0


def draw_tumour(brain: np.ndarray, radius: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """One tumour in ``brain`` (``[*S]`` bool): ``[3, *S]`` bool (necrotic, oedema, enhancing),
    disjoint, all inside the brain. ``radius``: ``(r_min, r_max)`` of the tumour core in pixels."""
    r = rng.uniform(*radius)
    f_n, f_o = rng.uniform(0.3, 0.6), rng.uniform(1.3, 1.8)
    depth = ndimage.distance_transform_edt(np.pad(brain, 1))[(slice(1, -1),) * brain.ndim]
    for reach in (f_o * r, r):
        candidates = np.argwhere(depth >= reach)
        if len(candidates):
            break
    else:
        raise ValueError(f"a tumour of radius {r:.1f} pixels does not fit in a brain mask of {int(brain.sum())} pixels "
                         f"(deepest point {depth.max():.1f} from its edge): lower the lesion radius")
    centre = candidates[rng.integers(len(candidates))]
    grids = np.meshgrid(*[np.arange(s) for s in brain.shape], indexing="ij")
    d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
    necrotic, core = d <= f_n * r, d <= r
    return np.stack([necrotic & brain, (d <= f_o * r) & ~core & brain, core & ~necrotic & brain])


def rule_masks(num: int, *, size: int, spatial_dims: int = 2, radius: tuple[float, float] = (2.0, 4.0),
               brains: Optional[np.ndarray] = None, seed: int = 0) -> np.ndarray:
    """``num`` masks ``[num, 4, *S]`` uint8 in {0, 1} (channels :data:`MASK_CHANNELS`), one tumour each.

    Args:
        num: masks to draw.
        size: side length ``S`` in pixels.
        spatial_dims: 2 (``[S, S]``) or 3 (``[S, S, S]``).
        radius: ``(r_min, r_max)`` of the tumour core (necrotic + enhancing) in pixels.
        brains: optional brain masks ``[B, *S]`` (e.g. a held-out bank's), used in turn; None =
            a random ellipse (ellipsoid) per mask.
        seed: seeds the generator; the same arguments give the same masks.
    """
    lo, hi = float(radius[0]), float(radius[1])
    if not 0 < lo <= hi:
        raise ValueError(f"lesion radius must be MIN,MAX with 0 < MIN <= MAX pixels, got {radius}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if brains is not None and (brains.ndim != spatial_dims + 1 or any(s != size for s in brains.shape[1:])):
        raise ValueError(f"brain masks of shape {brains.shape} do not fit [B, " + ", ".join([str(size)] * spatial_dims) + "]")
    rng = np.random.default_rng(seed)
    out = np.zeros((num, len(MASK_CHANNELS)) + (size,) * spatial_dims, np.uint8)
    for i in range(num):
        brain = ellipse_brain(size, spatial_dims, rng) if brains is None else brains[i % len(brains)].astype(bool)
        out[i, 0], out[i, 1:] = brain, draw_tumour(brain, (lo, hi), rng)
    return out
