"""Aligned (source, target) images for cross-modality translation, as training examples.

A translation example is the target image with its source image as the condition: datasets here
yield ``(target [1, *S], label, source [1, *S])`` triples, the shape of the ``(image, label, mask)``
triples of mask-conditioned synthesis, and :class:`PackedSource` packs them as ``(x0, label)`` pairs
with ``x0 = cat([target, source])`` that the spatially conditioned objective
(:class:`meddiff.diffusion.SpatialConditioning`) splits. Both images are in [-1, 1]: MR as the
single-image path normalises it; CT through the fixed linear map :func:`hu_to_model` of
:data:`CT_MODEL_RANGE_HU` (so HU are recovered exactly by :func:`model_to_hu` for the MAE in HU).

BraTS-layout cases (:class:`PairedVolumeDataset`) read two sequences of one case; both must share
one grid (shape and affine), or the pair is refused naming both files. They are preprocessed
alike, cropped by the source's foreground box, and sliced at the same indices.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from configs import DataConfig
from meddiff.data.phantom_anatomy import HU_CONTRASTS
from meddiff.data.readers import DataError, read_dicom_series, read_nifti
from meddiff.data.records import Record, _resample_label
from meddiff.data.transforms import fit_to_size, foreground_bbox, paired_train_augmentation, preprocess_volume

#: CT is trained in this HU range, mapped linearly to [-1, 1] (air to dense bone; clipped outside).
CT_MODEL_RANGE_HU = (-1000.0, 2000.0)
FOREGROUND = -0.95  # background is -1 after normalisation


def hu_to_model(hu: np.ndarray | torch.Tensor):
    """HU to [-1, 1]: ``x = 2 (HU - lo) / (hi - lo) - 1`` over :data:`CT_MODEL_RANGE_HU`, clipped."""
    lo, hi = CT_MODEL_RANGE_HU
    x = 2.0 * (hu - lo) / (hi - lo) - 1.0
    return x.clamp(-1.0, 1.0) if isinstance(x, torch.Tensor) else np.clip(x, -1.0, 1.0)


def model_to_hu(x: np.ndarray | torch.Tensor):
    """The inverse of :func:`hu_to_model` on [-1, 1]: ``HU = lo + (x + 1) (hi - lo) / 2``."""
    lo, hi = CT_MODEL_RANGE_HU
    return lo + (x + 1.0) * (hi - lo) / 2.0


def contrast_to_model(images: np.ndarray, contrast: str) -> np.ndarray:
    """A phantom contrast's images (MR in [0, 1], CT in HU) in the model's [-1, 1]."""
    return hu_to_model(images).astype(np.float32) if contrast in HU_CONTRASTS else (images * 2.0 - 1.0).astype(np.float32)


class PairedImages(Dataset):
    """In-memory aligned pairs: ``(target [C, *S], label, source [C, *S])`` float32 in [-1, 1].

    Args:
        target, source: ``[N, C, *S]`` on one grid; labels: ``[N]`` int64.
        patient_ids: the patient of each item (None: each item its own patient).
        augment: a dictionary transform moving ``image`` (the target) and ``source`` together.
    """

    condition_is_image = True  # the condition is an image in [-1, 1] (a scanner shift moves it too)
    mask_channels: tuple[str, ...] = ()

    def __init__(self, target: torch.Tensor, source: torch.Tensor, labels: torch.Tensor, *,
                 patient_ids: Optional[list[str]] = None, augment=None):
        if target.shape != source.shape or len(labels) != len(target):
            raise ValueError(f"{tuple(target.shape)} targets, {tuple(source.shape)} sources and {len(labels)} labels "
                             "are not aligned")
        self.target, self.source, self.labels, self.augment = target, source, labels, augment
        if patient_ids is not None:
            self.patient_ids = patient_ids

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        target, source = self.target[i], self.source[i]
        if self.augment is not None:
            out = self.augment({"image": target, "source": source})
            target, source = (torch.as_tensor(out[k]).clamp(-1.0, 1.0) for k in ("image", "source"))
        return target, self.labels[i], source


class PackedSource(Dataset):
    """``(target, label, source)`` triples as ``(cat([target, source]) [C_t + C_s, *S], label)`` pairs."""

    condition_is_image = True  # latent diffusion encodes the source as it encodes the target

    def __init__(self, dataset: Dataset):
        first = dataset[0] if len(dataset) else None
        if first is not None and (len(first) != 3 or not getattr(dataset, "condition_is_image", False)):
            raise ValueError(f"{type(dataset).__name__} yields no (target, label, source) image pairs")
        self.dataset = dataset
        self.labels = getattr(dataset, "labels", None)
        self.source_channels = int(first[2].shape[0]) if first is not None else 1
        if getattr(dataset, "patient_ids", None) is not None:
            self.patient_ids = dataset.patient_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        target, label, source = self.dataset[i]
        return torch.cat([target, source.to(target.dtype)], dim=0), label


def _read_scan(path: str):
    """A NIfTI file, or a DICOM series folder (in HU)."""
    return read_dicom_series(path) if Path(path).is_dir() else read_nifti(path)


def _as_ras(volume):
    """The volume with its voxel axes reordered and flipped to RAS (the same voxels in world space),
    so scans of one grid stored in different axis orders (a DICOM series, a NIfTI export) compare equal."""
    import nibabel as nib  # the orientation helpers; readers load nibabel lazily as well

    ornt = nib.orientations.io_orientation(volume.affine)
    array = nib.orientations.apply_orientation(volume.array, ornt)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.array.shape)
    return replace(volume, array=np.ascontiguousarray(array), affine=affine)


def read_pair(source_path: str, target_path: str):
    """Both volumes of a case, in RAS voxel order; a :class:`DataError` naming both files unless
    they share one grid."""
    source, target = _as_ras(_read_scan(source_path)), _as_ras(_read_scan(target_path))
    if source.array.shape != target.array.shape:
        raise DataError(f"{source_path} {source.array.shape} and {target_path} {target.array.shape}: source and target "
                        "are on different grids (shapes differ); a translation pair must be voxel-aligned")
    if not np.allclose(source.affine, target.affine, atol=1e-3):
        raise DataError(f"{source_path} and {target_path}: source and target are on different grids (affines differ); "
                        "a translation pair must be voxel-aligned")
    return source, target


def _aligned_slices(source: np.ndarray, target: np.ndarray, seg: Optional[np.ndarray], cfg: DataConfig):
    """2-D: the source's foreground box and kept slices, cut from both volumes alike."""
    box = foreground_bbox(source, threshold=FOREGROUND)
    src, tgt = source[box], target[box]
    lab = seg[box] if seg is not None else None
    axis, out = cfg.slice_axis, ([], [], [])
    for i in range(src.shape[axis]):
        s = np.take(src, i, axis=axis)
        if (s > FOREGROUND).mean() < cfg.min_foreground:
            continue
        for j, plane in enumerate((s, np.take(tgt, i, axis=axis))):
            out[j].append(fit_to_size(np.ascontiguousarray(np.rot90(plane)), cfg.image_size)[None])
        out[2].append(int(lab is not None and (np.take(lab, i, axis=axis) > 0).any()))
    return out


def _to_model(volume, contrast: str, cfg: DataConfig) -> np.ndarray:
    """RAS, resampled, in [-1, 1]: MR percentile-normalised, CT through :func:`hu_to_model`."""
    ct = contrast in HU_CONTRASTS
    array = preprocess_volume(volume, modality="hu" if ct else "mri", target_spacing=cfg.target_spacing,
                              percentiles=tuple(cfg.intensity_percentiles))[0]
    return hu_to_model(array).astype(np.float32) if ct else array


def load_pair(record: Record, cfg: DataConfig, *, spatial_dims: int = 2):
    """A case's source (``record.files[0]``) and target (``record.meta["target"]``) as
    ``(source [n, 1, *S], target [n, 1, *S], labels [n])`` in [-1, 1] (MR normalised, CT mapped from HU)."""
    source_vol, target_vol = read_pair(record.files[0], record.meta["target"])
    arrays = [_to_model(v, c, cfg) for v, c in ((source_vol, cfg.source_sequence), (target_vol, cfg.target_sequence))]
    seg = _resample_label(read_nifti(record.meta["seg"]), cfg)[0] if "seg" in record.meta else None
    if seg is not None and seg.shape != arrays[0].shape:
        raise DataError(f"{record.meta['seg']}: resampled segmentation {seg.shape} != image {arrays[0].shape}")
    if spatial_dims == 3:
        box = foreground_bbox(arrays[0], threshold=FOREGROUND)
        src, tgt = (fit_to_size(a[box], cfg.image_size)[None, None] for a in arrays)
        return src, tgt, np.asarray([record.label], np.int64)
    src, tgt, labels = _aligned_slices(arrays[0], arrays[1], seg, cfg)
    if not src:
        return (np.zeros((0, 1, cfg.image_size, cfg.image_size), np.float32),) * 2 + (np.zeros(0, np.int64),)
    return np.stack(src), np.stack(tgt), np.asarray(labels, np.int64)


class PairedVolumeDataset(PairedImages):
    """BraTS-layout records with a target sequence as :class:`PairedImages` (slices of one case share
    its patient); with ``train`` and ``data.augment``, one random flip/affine moves both images."""

    def __init__(self, records: list[Record], cfg: DataConfig, *, spatial_dims: int = 2, train: bool = False):
        loaded = [load_pair(r, cfg, spatial_dims=spatial_dims) for r in records]
        if not loaded or not sum(len(x[2]) for x in loaded):
            raise DataError("no (source, target) examples: the records hold no usable slices or volumes")
        source, target, labels = (torch.from_numpy(np.concatenate([x[k] for x in loaded])) for k in range(3))
        patients = [r.patient_id for r, x in zip(records, loaded) for _ in range(len(x[2]))]
        augment = paired_train_augmentation(spatial_dims, image_keys=("image", "source"), mask_keys=()) \
            if train and cfg.augment else None
        super().__init__(target, source, labels, patient_ids=patients, augment=augment)
