"""Writing samples: PNG grids, ``.npy`` arrays and NIfTI volumes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Map [-1, 1] floats to uint8 [0, 255]."""
    x = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, dtype=np.float32)
    return np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def image_grid(images: torch.Tensor | np.ndarray, *, nrow: int | None = None, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """Tile ``[N, C, H, W]`` (C = 1 or 3) images in [-1, 1] into one uint8 ``[H', W']`` or ``[H', W', 3]`` grid.

    3-D volumes ``[N, C, X, Y, Z]`` (RAS voxel order) are shown by their middle axial slice (the
    middle of Z), rotated so that anterior is up, as 2-D slices are cut.
    """
    x = to_uint8(images)
    if x.ndim == 5:
        x = np.ascontiguousarray(np.rot90(x[..., x.shape[-1] // 2], axes=(-2, -1)))
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected [N, 1|3, H, W] images, got shape {x.shape}")
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.zeros((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    grid = grid[0] if c == 1 else np.moveaxis(grid, 0, -1)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    return grid


def readable_upscale(side: int) -> int:
    """The integer zoom that shows images of ``side`` pixels at about 128 pixels or more."""
    return max(1, 128 // side)


def save_grid_png(images: torch.Tensor | np.ndarray, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, **kwargs)
    Image.fromarray(grid).save(path)
    return path


def save_nifti(volume: np.ndarray, path: str | Path, *, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    """Write a ``[D, H, W]`` (or ``[C, D, H, W]``) volume as NIfTI with a RAS affine of ``spacing`` mm.

    The array axes are taken as (x, y, z) = (D, H, W) in voxel order, so the affine is
    ``diag(spacing, 1)`` with the volume centred on the origin.
    """
    import nibabel as nib

    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim == 4:
        vol = np.moveaxis(vol, 0, -1)  # channels last for NIfTI
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    affine[:3, 3] = -0.5 * (np.array(vol.shape[:3]) - 1) * np.asarray(spacing)
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_samples(samples: torch.Tensor, out_dir: str | Path, stem: str, *, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, Path]:
    """Write ``samples`` (``[N, C, *S]`` in [-1, 1]) as ``<stem>.png`` (grid) and ``<stem>.npy``,
    plus ``<stem>_<i>.nii.gz`` per volume for 3-D samples. Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arr = samples.detach().cpu().float().numpy()
    written = {"png": save_grid_png(samples, out_dir / f"{stem}.png", upscale=readable_upscale(arr.shape[-1]))}
    np.save(out_dir / f"{stem}.npy", arr)
    written["npy"] = out_dir / f"{stem}.npy"
    if arr.ndim == 5:
        for i, vol in enumerate(arr):
            written[f"nii_{i}"] = save_nifti(vol[0] if vol.shape[0] == 1 else vol, out_dir / f"{stem}_{i:03d}.nii.gz", spacing=spacing)
    return written


def label_map(masks: np.ndarray) -> np.ndarray:
    """Multi-label masks ``[K, *S]`` in {0, 1} as one label map ``[*S]`` uint8: each pixel takes
    ``k + 1`` for the last channel ``k`` that covers it (0 where none does). With the phantoms'
    channels (brain, necrotic, oedema, enhancing) this is 1 brain, 2 necrotic, 3 oedema, 4 enhancing."""
    masks = np.asarray(masks) > 0
    levels = np.arange(1, masks.shape[0] + 1, dtype=np.uint8).reshape(-1, *[1] * (masks.ndim - 1))
    return (masks * levels).max(axis=0).astype(np.uint8)


def write_pairs(images: torch.Tensor, masks: torch.Tensor, out_dir: str | Path, stem: str, *,
                spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, Path]:
    """Write generated images with the masks they were generated from, for a segmentation pipeline.

    Always ``<stem>_pairs.npz`` (``images [N, C, *S]`` float32 in [-1, 1], ``masks [N, K, *S]``
    uint8); for 2-D, ``<stem>_<i>_image.png`` and ``<stem>_<i>_mask.png`` (the :func:`label_map`);
    for 3-D, ``<stem>_<i>_image.nii.gz`` and ``<stem>_<i>_mask.nii.gz`` with one affine.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arr = images.detach().cpu().float().numpy()
    m = (masks.detach().cpu().numpy() > 0).astype(np.uint8)
    if arr.shape[0] != m.shape[0] or arr.shape[2:] != m.shape[2:]:
        raise ValueError(f"images {arr.shape} and masks {m.shape} are not pairs on one grid")
    written = {"npz": out_dir / f"{stem}_pairs.npz"}
    np.savez_compressed(written["npz"], images=arr, masks=m)
    for i in range(arr.shape[0]):
        name = out_dir / f"{stem}_{i:03d}"
        if arr.ndim == 4:
            written[f"image_{i}"] = save_grid_png(arr[i:i + 1], f"{name}_image.png", pad=0)
            written[f"mask_{i}"] = Path(f"{name}_mask.png")
            Image.fromarray(label_map(m[i])).save(written[f"mask_{i}"])
        else:
            written[f"image_{i}"] = save_nifti(arr[i, 0] if arr.shape[1] == 1 else arr[i], f"{name}_image.nii.gz", spacing=spacing)
            written[f"mask_{i}"] = save_nifti(label_map(m[i]), f"{name}_mask.nii.gz", spacing=spacing)
    return written


def outline(masks: torch.Tensor) -> torch.Tensor:
    """The boundary of binary ``masks [N, 1, *S]`` (2-D or 3-D): mask pixels with a face or corner
    neighbour outside the mask (the mask minus its 3x3(x3) erosion); same shape, {0, 1}."""
    m = masks.float()
    pool = torch.nn.functional.max_pool2d if m.ndim == 4 else torch.nn.functional.max_pool3d
    eroded = 1.0 - pool(1.0 - m, kernel_size=3, stride=1, padding=1)
    return (m - eroded).clamp(0.0, 1.0)


def save_overlay_png(images: torch.Tensor, regions: torch.Tensor, path: str | Path, **kwargs) -> Path:
    """Grey ``images [N, 1, *S]`` in [-1, 1] with the outline of ``regions [N, 1, *S]`` (binary) in
    red, tiled by :func:`save_grid_png` (3-D: the middle axial slice)."""
    if images.shape[0] != regions.shape[0] or images.shape[2:] != regions.shape[2:] or images.shape[1] != 1:
        raise ValueError(f"images {tuple(images.shape)} and regions {tuple(regions.shape)} are not [N, 1, *S] pairs")
    edge = outline(regions).bool()
    rgb = images.float().repeat(1, 3, *[1] * (images.ndim - 2))
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, *[1] * (images.ndim - 2)).expand_as(rgb)
    return save_grid_png(torch.where(edge.expand_as(rgb), red, rgb), path, **kwargs)
