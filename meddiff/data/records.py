"""A dataset's records and how one is loaded.

A :class:`Record` is one patient-level unit found by :func:`meddiff.data.adapters.index_dataset`;
:func:`load_record` reads and preprocesses it into model-ready arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from configs import DataConfig
from meddiff.data.medmnist import read_medmnist_npz
from meddiff.data.readers import DataError, read_dicom_series, read_image, read_nifti
from meddiff.data.transforms import (RAS_LABELS, crop_foreground, crop_or_pad_volume, extract_slices, fit_to_size,
                                     preprocess_volume)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_MODALITY = {"brats": "mri", "ixi": "mri", "lidc": "ct", "folder": "mri", "covid_ct": "ct", "chexpert": "ct", "medmnist": "mri"}


@dataclass(frozen=True)
class Record:
    """One patient-level unit of a dataset.

    Attributes:
        sample_id: unique within the dataset.
        patient_id: units of one patient never go to different sites or splits.
        label: unit-level label (a volume is 1 if any slice is).
        files: the files read to load it.
        kind: ``"volume"`` (NIfTI), ``"dicom"`` (series folder), ``"image"`` (2-D) or ``"npz"``.
        meta: extra fields (e.g. ``site``, ``seg``, ``index``).
    """

    sample_id: str
    patient_id: str
    label: int
    files: tuple[str, ...]
    kind: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class IndexResult:
    records: list[Record]
    bad: list[str] = field(default_factory=list)  # "path: reason" for skipped items


@lru_cache(maxsize=4)
def npz_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One read of a MedMNIST split per process: ``(images uint8 channels-first, labels)``."""
    return read_medmnist_npz(path, split, spatial_dims=None)


def npz_images(records: list[Record], size: int) -> np.ndarray:
    """MedMNIST records as model input: ``[n, 1, size, size]`` float32 in [-1, 1] (RGB averaged)."""
    images = npz_split(records[0].files[0], records[0].meta["split"])[0][[r.meta["index"] for r in records]]
    arr = images.astype(np.float32) / 127.5 - 1.0
    if arr.shape[1] == 3:
        arr = arr.mean(1, keepdims=True)
    if arr.shape[-1] != size:
        arr = np.stack([fit_to_size(a[0], size)[None] for a in arr])
    return arr


def load_record(record: Record, cfg: DataConfig, *, spatial_dims: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Read and preprocess one record.

    Returns:
        ``images [n, 1, S, S]`` (2-D; volumes give their foreground slices) or ``[1, 1, S, S, S]``
        (3-D: resampled to ``data.target_spacing`` and cropped/padded around the foreground, or,
        without a target spacing, the foreground box padded to a cube and resized), float32 in
        [-1, 1], and ``labels [n]`` int64.
    Raises:
        DataError naming the file and the problem.
    """
    size = cfg.image_size
    modality = cfg.modality if cfg.modality != "auto" else DEFAULT_MODALITY.get(cfg.dataset, "mri")
    if record.kind == "npz":
        return npz_images([record], size), np.asarray([record.label], np.int64)
    if record.kind == "image":
        img = read_image(record.files[0])[0] * 2.0 - 1.0
        if spatial_dims != 2:
            raise DataError(f"{record.files[0]}: a 2-D image cannot train a 3-D model (model.spatial_dims=3)")
        return fit_to_size(img, size)[None, None], np.asarray([record.label], np.int64)
    volume = read_dicom_series(record.files[0]) if record.kind == "dicom" else read_nifti(record.files[0])
    array, _ = preprocess_volume(volume, modality=modality, target_spacing=cfg.target_spacing,
                                 hu_window_name=cfg.hu_window, percentiles=tuple(cfg.intensity_percentiles))
    seg = None
    if "seg" in record.meta:
        seg_vol = read_nifti(record.meta["seg"])
        if seg_vol.array.shape != volume.array.shape:
            raise DataError(f"{record.meta['seg']}: segmentation shape {seg_vol.array.shape} does not match "
                            f"image shape {volume.array.shape} ({record.files[0]})")
        seg, _ = _resample_label(seg_vol, cfg)
        if seg.shape != array.shape:
            raise DataError(f"{record.meta['seg']}: resampled segmentation {seg.shape} != image {array.shape}")
    if spatial_dims == 3:
        # at a target spacing: crop/pad (voxels keep their size); otherwise fit the foreground and resize
        vol = crop_or_pad_volume(array, size) if cfg.target_spacing else fit_to_size(crop_foreground(array), size)
        label = int(seg is not None and (seg > 0).any()) if seg is not None else record.label
        return vol[None, None], np.asarray([label], np.int64)
    slices, labels, _ = extract_slices(array, axis=cfg.slice_axis, min_foreground=cfg.min_foreground, image_size=size,
                                       label_volume=seg)
    if seg is None:
        labels[:] = record.label
    return slices, labels


def _resample_label(seg, cfg: DataConfig):
    """Nearest-neighbour orientation/resampling of a segmentation, matching :func:`preprocess_volume`."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    x = MetaTensor(torch.from_numpy(seg.array)[None], affine=torch.from_numpy(seg.affine))
    x = Orientation(axcodes="RAS", labels=RAS_LABELS)(x)
    if cfg.target_spacing:
        x = Spacing(pixdim=tuple(cfg.target_spacing), mode="nearest")(x)
    return np.asarray(x.as_tensor()[0]), np.asarray(x.affine)
