"""Masks to generate from: given ones (``meddiff sample --masks``) or a held-out mask bank.

A mask set is ``[N, K, *S]`` in {0, 1}, one channel per region, in the channel order the model
was trained with (``model.cond_channels``; the phantoms': brain, necrotic, oedema, enhancing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from configs import ExperimentConfig
from meddiff.data.phantoms import make_phantoms
from meddiff.data.transforms import fit_mask_to_size

#: Offset of the held-out phantom stream (the one ``meddiff evaluate`` compares against), which
#: no training set draws from.
HELD_OUT_SEED_OFFSET = 7919


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


def study_masks(cfg: ExperimentConfig, num: int) -> torch.Tensor | None:
    """The masks a federated study draws its sample grids and FID samples from: ``[num, K, S, S]``
    from the held-out phantom bank, or None (the null condition: the model's unconditional samples)
    where there is no bank, and for a model without mask conditioning."""
    if not cfg.model.cond_channels or cfg.data.dataset != "phantoms":
        return None
    return mask_bank(cfg, num)
