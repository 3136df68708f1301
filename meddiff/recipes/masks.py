"""Masks to generate from: given ones (``meddiff sample --masks``), a held-out mask bank, or
tumours placed by rules (:mod:`meddiff.data.lesions`) in a given, held-out or elliptical brain.

A mask set is ``[N, K, *S]`` in {0, 1}, one channel per region, in the channel order the model
was trained with (``model.cond_channels``; the phantoms': brain, necrotic, oedema, enhancing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from configs import ExperimentConfig
from meddiff.data.lesions import rule_masks
from meddiff.data.phantoms import make_phantoms
from meddiff.data.transforms import fit_mask_to_size

#: Offset of the held-out phantom stream (the one ``meddiff evaluate`` compares against), which
#: no training set draws from.
HELD_OUT_SEED_OFFSET = 7919
#: Index of the held-out phantom stream where the real test pairs start, far past the mask bank's
#: first indices, so no test mask is also a mask an image was generated from.
TEST_START = 1_000_000
BRATS_TEST_FRACTION = 0.2  # patients held out of a BraTS-layout folder as real test pairs


def held_out_patients(patients: list[str], seed: int = 0) -> set[str]:
    """A seeded :data:`BRATS_TEST_FRACTION` (at least one) of ``patients`` (sorted ids), held out as test pairs."""
    order = np.random.default_rng(seed).permutation(len(patients))
    return {patients[i] for i in order[:max(1, round(BRATS_TEST_FRACTION * len(patients)))]}


def load_masks(path: str | Path, cfg: ExperimentConfig) -> torch.Tensor:
    """Masks from an ``.npz`` (array ``masks`` ``[N, K, *S]``) or a folder of ``.npy`` files
    (``[K, *S]`` each, in name order), resized by nearest neighbour to the model's size.

    Returns ``[N, model.cond_channels, *S]`` float32 in {0, 1}; a clear error for anything else.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise ValueError(f"--masks {path}: the folder holds no .npy mask files ([K, *S] each)")
        arr = np.stack([np.load(f) for f in files])
    elif path.suffix == ".npz":
        with np.load(path) as z:
            if "masks" not in z:
                raise ValueError(f"--masks {path}: no array named 'masks' (found {sorted(z.files)})")
            arr = z["masks"]
    else:
        raise ValueError(f"--masks {path}: expected an .npz file or a folder of .npy files")
    m, dims = cfg.model.cond_channels, cfg.model.spatial_dims
    if arr.ndim != 2 + dims or arr.shape[1] != m:
        raise ValueError(f"--masks {path}: shape {arr.shape}, expected [N, {m}, " + ", ".join(["S"] * dims)
                         + f"] (model.cond_channels={m}, model.spatial_dims={dims})")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"--masks {path}: masks must hold only 0 and 1")
    size = cfg.data.image_size
    if any(s != size for s in arr.shape[2:]):
        arr = np.stack([fit_mask_to_size(a.astype(np.uint8), size) for a in arr])
    return torch.from_numpy(arr.astype(np.float32))


def mask_bank(cfg: ExperimentConfig, num: int, *, seed: int = 0) -> torch.Tensor:
    """``num`` masks with a tumour from the held-out phantom stream (``data.seed`` + 7919, the
    evaluation's held-out set); ``seed`` picks which ``num`` of them. Returns ``[num, K, S, S]``."""
    if cfg.data.dataset != "phantoms":
        raise ValueError(f"no mask bank for data.dataset={cfg.data.dataset!r} yet: pass --masks DIR|NPZ")
    _, _, masks = make_phantoms(num, cfg.data.image_size, seed=cfg.data.seed + HELD_OUT_SEED_OFFSET, lesion_fraction=1.0,
                                start=seed * num, masks=True)
    if masks.shape[1] != cfg.model.cond_channels:
        raise ValueError(f"the phantom mask bank has {masks.shape[1]} channels, model.cond_channels is {cfg.model.cond_channels}")
    return torch.from_numpy(masks.astype(np.float32))


def default_lesion_radius(size: int) -> tuple[float, float]:
    """Tumour-core radii ``(min, max)`` in pixels when none are given: 1/20 to 1/10 of the side."""
    return max(1.0, size / 20), max(1.0, size / 10)


def load_brains(path: str | Path, cfg: ExperimentConfig) -> np.ndarray:
    """Brain masks from an ``.npy`` (``[*S]`` or ``[B, *S]`` in {0, 1}), resized by nearest neighbour
    to ``data.image_size``; returns ``[B, *S]`` uint8."""
    path, dims = Path(path), cfg.model.spatial_dims
    if path.suffix != ".npy" or not path.is_file():
        raise ValueError(f"--brain-masks {path}: expected an existing .npy file ([*S] or [B, *S] in {{0, 1}})")
    arr = np.load(path)
    arr = arr[None] if arr.ndim == dims else arr
    if arr.ndim != dims + 1 or not np.isin(arr, (0, 1)).all():
        raise ValueError(f"--brain-masks {path}: shape {arr.shape}, expected {dims}-D masks in {{0, 1}} "
                         f"(model.spatial_dims={dims})")
    return fit_mask_to_size(arr.astype(np.uint8), cfg.data.image_size)


def lesion_rule_masks(cfg: ExperimentConfig, num: int, *, seed: int = 0, radius: tuple[float, float] | None = None,
                      brains: np.ndarray | None = None) -> torch.Tensor:
    """``num`` rule-placed tumour masks ``[num, 4, *S]`` float32 in {0, 1}, in ``brains`` (``[B, *S]``)
    if given, else in the held-out phantom brains (phantoms), else in random ellipses."""
    size, dims = cfg.data.image_size, cfg.model.spatial_dims
    if cfg.model.cond_channels != 4:
        raise ValueError(f"rule-placed masks have 4 channels (brain, necrotic, oedema, enhancing); "
                         f"model.cond_channels is {cfg.model.cond_channels}: pass --masks")
    if brains is None and cfg.data.dataset == "phantoms" and dims == 2:
        _, _, bank = make_phantoms(num, size, seed=cfg.data.seed + HELD_OUT_SEED_OFFSET, lesion_fraction=0.0,
                                   start=seed * num, masks=True)
        brains = bank[:, 0]
    masks = rule_masks(num, size=size, spatial_dims=dims, radius=radius or default_lesion_radius(size), brains=brains,
                       seed=seed)
    return torch.from_numpy(masks.astype(np.float32))


def masks_to_sample(cfg: ExperimentConfig, num: int, *, seed: int = 0, path: str | Path | None = None,
                    rules: bool = False, radius: tuple[float, float] | None = None,
                    brain_path: str | Path | None = None) -> torch.Tensor:
    """The masks ``meddiff sample`` generates from: ``path`` (``--masks``) if given; else the held-out
    phantom bank for phantoms, unless ``rules`` (``--lesion-rules``); else rule-placed tumours."""
    if path is not None:
        return load_masks(path, cfg)
    if cfg.data.dataset == "phantoms" and not rules and radius is None and brain_path is None:
        return mask_bank(cfg, num, seed=seed)
    brains = load_brains(brain_path, cfg) if brain_path is not None else None
    return lesion_rule_masks(cfg, num, seed=seed, radius=radius, brains=brains)


def study_masks(cfg: ExperimentConfig, num: int) -> torch.Tensor | None:
    """The masks a federated study draws its sample grids and FID samples from: ``[num, K, *S]``
    from the held-out phantom bank, rule-placed tumours for other 4-channel data, or None (the
    null condition: the model's unconditional samples) for other channel layouts and for a model
    without mask conditioning."""
    if not cfg.model.cond_channels or (cfg.data.dataset != "phantoms" and cfg.model.cond_channels != 4):
        return None
    return masks_to_sample(cfg, num)
