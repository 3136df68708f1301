"""Preprocessing that is correct for medical images, built on MONAI transforms.

Order for a volume: orientation to RAS -> resampling to a target spacing -> intensity (CT: HU
window *then* scaling to [-1, 1]; MRI: percentile normalisation) -> foreground crop -> slices (or
the whole volume) -> pad to square/cube and resize to the model size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from meddiff.data.readers import Volume

#: NIfTI/nibabel world-axis labels (RAS+), passed explicitly to MONAI's Orientation.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

#: (center, width) in Hounsfield units.
HU_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "lung": (-600.0, 1500.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}


def hu_window(x: np.ndarray | torch.Tensor, *, center: float, width: float):
    """Clip to the window ``[center - width/2, center + width/2]`` HU, then map it linearly to [-1, 1].

    Windowing happens on raw HU, before any scaling (clipping HU values after a [0, 1]
    normalisation is a common tutorial bug).
    """
    from monai.transforms import ScaleIntensityRange

    if width <= 0:
        raise ValueError(f"HU window width must be > 0, got {width}")
    lo, hi = center - width / 2.0, center + width / 2.0
    return ScaleIntensityRange(a_min=lo, a_max=hi, b_min=-1.0, b_max=1.0, clip=True)(x)


def window_by_name(x, name: str):
    if name not in HU_WINDOWS:
        raise ValueError(f"unknown HU window {name!r}; presets: {sorted(HU_WINDOWS)}")
    center, width = HU_WINDOWS[name]
    return hu_window(x, center=center, width=width)


def hu_display(x: np.ndarray | torch.Tensor, window: str = "brain"):
    """A CT image in HU as a display image in [0, 1] through a preset window of :data:`HU_WINDOWS`
    (``brain`` = center 40, width 80 HU: CSF dark, grey matter brighter than white, bone white).
    For viewing only; CT images and their metrics stay in HU."""
    return (window_by_name(x, window) + 1.0) / 2.0


def percentile_normalise(x, *, lower: float = 0.5, upper: float = 99.5):
    """MRI intensities: map the ``[lower, upper]`` percentiles to [-1, 1] and clip (MONAI)."""
    from monai.transforms import ScaleIntensityRangePercentiles

    return ScaleIntensityRangePercentiles(lower=lower, upper=upper, b_min=-1.0, b_max=1.0, clip=True)(x)


def preprocess_volume(
    volume: Volume,
    *,
    modality: str,
    target_spacing: Sequence[float] = (),
    hu_window_name: str = "brain",
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> tuple[np.ndarray, np.ndarray]:
    """Orient to RAS, resample and normalise a volume.

    Args:
        modality: ``"ct"`` (HU windowing), ``"mri"`` (percentile normalisation) or ``"hu"`` (kept in HU).
        target_spacing: mm per voxel ``(x, y, z)``; empty keeps the native spacing.
    Returns:
        ``(array [X, Y, Z] float32 in [-1, 1] (HU for ``"hu"``) in RAS order, affine [4, 4])``.
    """
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    x = MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.array))[None], affine=torch.from_numpy(volume.affine))
    x = Orientation(axcodes="RAS", labels=RAS_LABELS)(x)
    if target_spacing:
        if len(target_spacing) != 3 or min(target_spacing) <= 0:
            raise ValueError(f"target_spacing must be three positive numbers (mm), got {list(target_spacing)}")
        x = Spacing(pixdim=tuple(float(s) for s in target_spacing), mode="bilinear")(x)
    if modality == "ct":
        x = window_by_name(x, hu_window_name)
    elif modality == "mri":
        x = percentile_normalise(x, lower=percentiles[0], upper=percentiles[1])
    elif modality != "hu":
        raise ValueError(f"modality must be 'ct', 'mri' or 'hu', got {modality!r}")
    affine = np.asarray(x.affine, dtype=np.float64)
    return np.asarray(x.as_tensor()[0], dtype=np.float32), affine


def foreground_bbox(array: np.ndarray, *, threshold: float = -0.95) -> tuple[slice, ...]:
    """Bounding box of voxels above ``threshold`` (background is -1 after normalisation)."""
    fg = array > threshold
    if not fg.any():
        return tuple(slice(0, s) for s in array.shape)
    idx = [np.where(fg.any(axis=tuple(j for j in range(array.ndim) if j != i)))[0] for i in range(array.ndim)]
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)


def crop_foreground(array: np.ndarray, *, threshold: float = -0.95) -> np.ndarray:
    return array[foreground_bbox(array, threshold=threshold)]


def fit_to_size(array: np.ndarray, size: int) -> np.ndarray:
    """Pad (with the background value -1) to a square/cube, then resize to ``size`` per side.

    Args:
        array: ``[H, W]`` or ``[D, H, W]`` in [-1, 1].
    Returns:
        ``[size, size]`` or ``[size, size, size]`` float32.
    """
    from monai.transforms import Resize, SpatialPad

    side = max(array.shape)
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    t = SpatialPad(spatial_size=(side,) * array.ndim, mode="constant", value=-1.0)(t)
    mode = "area" if side >= size else ("bilinear" if array.ndim == 2 else "trilinear")
    t = Resize(spatial_size=(size,) * array.ndim, mode=mode)(t)
    return np.asarray(t[0], dtype=np.float32)


def crop_or_pad_volume(array: np.ndarray, size: int, *, threshold: float = -0.95) -> np.ndarray:
    """Centre a volume's foreground in a ``size``-cube, at its current spacing (no resizing).

    The foreground box is cropped, then cropped or padded (with the background value -1)
    symmetrically to ``size`` per side (MONAI ``ResizeWithPadOrCrop``). Used for 3-D models with
    ``data.target_spacing``: every voxel keeps its physical size, so generated volumes carry an
    exact affine.

    Args:
        array: ``[X, Y, Z]`` in [-1, 1].
    Returns:
        ``[size, size, size]`` float32.
    """
    from monai.transforms import ResizeWithPadOrCrop

    box = crop_foreground(array, threshold=threshold)
    t = torch.from_numpy(np.ascontiguousarray(box, dtype=np.float32))[None]
    t = ResizeWithPadOrCrop(spatial_size=(size,) * array.ndim, mode="constant", value=-1.0)(t)
    return np.asarray(t[0], dtype=np.float32)


def extract_slices(
    array: np.ndarray,
    *,
    axis: int = 2,
    min_foreground: float = 0.1,
    image_size: int = 64,
    threshold: float = -0.95,
    label_volume: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a normalised RAS volume into 2-D slices, skipping near-empty ones.

    The volume is first cropped to its foreground box, so every slice shares one crop. A slice is
    kept when its foreground fraction (voxels above ``threshold`` within the crop) is at least
    ``min_foreground``. Slices are rotated so anterior is up (radiological display).

    Args:
        array: ``[X, Y, Z]`` in [-1, 1].
        label_volume: optional same-shape segmentation; a slice's label is 1 if it has any voxel > 0.
    Returns:
        ``(slices [n, 1, S, S], labels [n] int64, slice_indices [n])``.
    """
    if not 0 <= axis <= 2:
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    box = foreground_bbox(array, threshold=threshold)
    vol = array[box]
    seg = label_volume[box] if label_volume is not None else None
    out, labels, kept = [], [], []
    for i in range(vol.shape[axis]):
        sl = np.take(vol, i, axis=axis)
        if (sl > threshold).mean() < min_foreground:
            continue
        out.append(fit_to_size(np.rot90(sl), image_size))
        labels.append(int(seg is not None and (np.take(seg, i, axis=axis) > 0).any()))
        kept.append(box[axis].start + i)
    if not out:
        return np.zeros((0, 1, image_size, image_size), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.stack(out)[:, None], np.asarray(labels, np.int64), np.asarray(kept, np.int64)


def train_augmentation(spatial_dims: int = 2):
    """Flips and a small random affine (rotation ±0.1 rad, scale ±5%), for training only (MONAI)."""
    from monai.transforms import Compose, RandAffine, RandFlip

    return Compose([
        RandFlip(prob=0.5, spatial_axis=0),
        RandAffine(prob=0.5, rotate_range=(0.1,) * (1 if spatial_dims == 2 else 3), scale_range=(0.05,) * spatial_dims,
                   padding_mode="border", mode="bilinear"),
    ])


def fit_mask_to_size(mask: np.ndarray, size: int) -> np.ndarray:
    """:func:`fit_to_size` for a label mask: pad with 0 (background), resize by nearest neighbour
    (MONAI ``Resize``), so labels are never blended and the mask stays on its image's grid. The
    ``nearest-exact`` rule samples each output pixel at its centre, as area and bilinear resizing
    of the image do; plain ``nearest`` (floor) would shift the mask by up to half an output pixel.

    Args:
        mask: ``[K, H, W]`` or ``[K, D, H, W]`` (K mask channels, or one label map).
    Returns:
        ``[K, size, size(, size)]`` of ``mask``'s dtype.
    """
    from monai.transforms import Resize, SpatialPad

    spatial = mask.shape[1:]
    t = torch.from_numpy(np.ascontiguousarray(mask))
    t = SpatialPad(spatial_size=(max(spatial),) * len(spatial), mode="constant", value=0)(t)
    t = Resize(spatial_size=(size,) * len(spatial), mode="nearest-exact")(t.float())
    return np.asarray(t).astype(mask.dtype)


def paired_train_augmentation(spatial_dims: int = 2, *, image_keys: Sequence[str] = ("image",),
                              mask_keys: Sequence[str] = ("mask",)):
    """:func:`train_augmentation` applied identically to images and masks (MONAI dictionary
    transforms share one random draw across their keys), e.g. a source image, its translation
    target (``image_keys=("image", "target")``) and their mask: images are interpolated bilinearly
    with border padding (so a CT's air stays air), masks by nearest neighbour with zero (background)
    padding."""
    from monai.transforms import Compose, RandAffined, RandFlipd

    keys = tuple(image_keys) + tuple(mask_keys)
    return Compose([
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandAffined(keys=keys, prob=0.5, rotate_range=(0.1,) * (1 if spatial_dims == 2 else 3),
                    scale_range=(0.05,) * spatial_dims,
                    padding_mode=("border",) * len(image_keys) + ("zeros",) * len(mask_keys),
                    mode=("bilinear",) * len(image_keys) + ("nearest",) * len(mask_keys)),
    ])


def resample_pair(image: torch.Tensor, mask: torch.Tensor, affine: np.ndarray, spacing: Sequence[float]):
    """Orient an image ``[1, X, Y, Z]`` and its mask ``[K, X, Y, Z]`` (one ``affine``) to RAS and
    resample both to ``spacing`` mm: bilinear for the image, nearest neighbour for the mask (MONAI
    ``Orientationd`` / ``Spacingd``). Returns ``(image, mask, affine [4, 4])`` on one grid."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientationd, Spacingd

    aff = torch.as_tensor(affine, dtype=torch.float64)
    data = {"image": MetaTensor(image.float(), affine=aff), "mask": MetaTensor(mask.float(), affine=aff)}
    out = Compose([Orientationd(keys=("image", "mask"), axcodes="RAS", labels=RAS_LABELS),
                   Spacingd(keys=("image", "mask"), pixdim=tuple(float(s) for s in spacing),
                            mode=("bilinear", "nearest"))])(data)
    return out["image"].as_tensor(), out["mask"].as_tensor().round().to(mask.dtype), np.asarray(out["image"].affine)


def crop_foreground_pair(array: np.ndarray, mask: np.ndarray, *, threshold: float = -0.95):
    """:func:`crop_foreground` of an image ``[*S]`` and the same box of its mask ``[K, *S]``."""
    box = foreground_bbox(array, threshold=threshold)
    return array[box], mask[(slice(None),) + box]
