"""Volumes with their segmentations as ``(image, label, mask)`` examples (BraTS layouts, the
pseudo-patient cohorts of ``meddiff data from-template``, which use the BraTS layout, and folder
CSVs with a ``mask`` column: NIfTI volumes with NIfTI label maps, 2-D images with PNG/NPY ones).

The mask channels are the phantoms' (:data:`~meddiff.data.phantoms.MASK_CHANNELS`): the brain
(the image's foreground after normalisation), then the BraTS sub-regions necrotic core (label 1),
oedema (2) and enhancing tumour (3; 4 in BraTS releases up to 2021). The segmentation is
reoriented and resampled by nearest neighbour exactly as the image is, then cut by the image's
foreground box, slices, rotation, padding and resizing (nearest neighbour), so every mask stays on
its image's grid. Loaded in memory, without the array cache, since mask-conditioned studies are
small so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from configs import DataConfig
from meddiff.data.phantoms import MASK_CHANNELS
from meddiff.data.readers import DataError, read_image, read_nifti
from meddiff.data.records import DEFAULT_MODALITY, Record, _resample_label
from meddiff.data.transforms import (crop_foreground_pair, extract_slices, fit_mask_to_size, fit_to_size, foreground_bbox,
                                     paired_train_augmentation, preprocess_volume)

FOREGROUND = -0.95  # background is -1 after normalisation (the threshold of the image's foreground crop)


def seg_channels(seg: np.ndarray, image: np.ndarray) -> np.ndarray:
    """A BraTS label volume ``[*S]`` and its normalised image as ``[4, *S]`` uint8 channels."""
    return np.stack([image > FOREGROUND, seg == 1, seg == 2, (seg == 3) | (seg == 4)]).astype(np.uint8)


def _volume_pair(array: np.ndarray, channels: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """3-D: the foreground box of both, then crop/pad at the target spacing or fit and resize."""
    from monai.transforms import ResizeWithPadOrCrop

    box, mbox = crop_foreground_pair(array, channels, threshold=FOREGROUND)
    size = (cfg.image_size,) * 3
    if cfg.target_spacing:
        img = ResizeWithPadOrCrop(spatial_size=size, mode="constant", value=-1.0)(torch.from_numpy(box)[None])[0]
        msk = ResizeWithPadOrCrop(spatial_size=size, mode="constant", value=0)(torch.from_numpy(mbox))
        return np.asarray(img, np.float32), np.asarray(msk).astype(np.uint8)
    return fit_to_size(box, cfg.image_size), fit_mask_to_size(mbox, cfg.image_size)


def read_label_map(path: str | Path) -> np.ndarray:
    """A 2-D label map: a one-channel PNG (mode L, I, P or 1) or an ``.npy`` (``[H, W]`` labels, or
    ``[4, H, W]`` channels brain, necrotic, oedema, enhancing in {0, 1}); non-negative integers."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mask file not found")
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                if img.mode not in ("L", "I", "I;16", "P", "1"):
                    raise DataError(f"{path}: a label-map PNG has one channel (mode L, I or P), not {img.mode}")
                arr = np.asarray(img)
    except DataError:
        raise
    except Exception as exc:  # truncated PNG, bad NPY header, ...
        raise DataError(f"{path}: corrupt or unreadable mask ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(arr, np.float64)
    if not (np.isfinite(arr).all() and (arr >= 0).all() and (arr == np.round(arr)).all()):
        raise DataError(f"{path}: a mask holds non-negative integer labels")
    return arr.astype(np.int64)


def mask_channels_of(labels: np.ndarray, image: np.ndarray, source: str) -> np.ndarray:
    """``[4, *S]`` uint8 from a label map ``[*S]`` (BraTS labels, :func:`seg_channels`; the brain is
    the image's foreground) or from given channels ``[4, *S]`` in {0, 1} (the brain is channel 0)."""
    if labels.shape == image.shape:
        return seg_channels(labels, image)
    if labels.shape == (len(MASK_CHANNELS),) + image.shape and labels.max(initial=0) <= 1:
        return labels.astype(np.uint8)
    raise DataError(f"{source}: mask shape {labels.shape} fits neither the image {image.shape} (a label map) nor "
                    f"{(len(MASK_CHANNELS),) + image.shape} (channels {', '.join(MASK_CHANNELS)} in {{0, 1}})")


def _image_with_masks(record: Record, cfg: DataConfig, *, spatial_dims: int):
    """A 2-D image of a folder CSV and its mask, padded and resized alike (nearest neighbour for the mask)."""
    if spatial_dims != 2:
        raise DataError(f"{record.files[0]}: a 2-D image cannot train a 3-D model (model.spatial_dims=3)")
    image = read_image(record.files[0])[0] * 2.0 - 1.0
    channels = mask_channels_of(read_label_map(record.meta["mask"]), image, record.meta["mask"])
    return (fit_to_size(image, cfg.image_size)[None, None], np.asarray([record.label], np.int64),
            fit_mask_to_size(channels, cfg.image_size)[None])


def load_record_with_masks(record: Record, cfg: DataConfig, *, spatial_dims: int = 2):
    """:func:`~meddiff.data.records.load_record` for a record with a segmentation, plus its masks:
    a BraTS ``seg`` (labels: 1 where the slice or volume has tumour), or the ``mask`` of a folder
    CSV row (a NIfTI label map for a volume, a PNG/NPY for a 2-D image; labels: the row's).

    Returns ``images [n, 1, *S]`` float32 in [-1, 1], ``labels [n]`` int64 and ``masks [n, 4, *S]``
    uint8 aligned with the images. A missing or corrupt mask raises :class:`DataError` naming the
    file and, for a folder CSV, its row.
    """
    seg = record.meta.get("seg") or record.meta.get("mask")
    if seg is None or record.kind not in ("volume", "image"):
        raise DataError(f"{record.sample_id}: no segmentation to give masks from (a BraTS-layout case has a -seg file; "
                        "a folder CSV needs a 'mask' column)")
    try:
        if record.kind == "image":
            return _image_with_masks(record, cfg, spatial_dims=spatial_dims)
        images, labels, masks = _volume_with_masks(record, seg, cfg, spatial_dims=spatial_dims)
    except DataError as exc:
        raise DataError(f"{record.meta['row']}: {exc}") if "row" in record.meta else exc from None
    if "seg" not in record.meta:
        labels[:] = record.label
    return images, labels, masks


def _volume_with_masks(record: Record, seg_path: str, cfg: DataConfig, *, spatial_dims: int):
    """A NIfTI volume and its label map ``seg_path``, reoriented, resampled and cut alike."""
    volume, seg_vol = read_nifti(record.files[0]), read_nifti(seg_path)
    if seg_vol.array.shape != volume.array.shape:
        raise DataError(f"{seg_path}: segmentation shape {seg_vol.array.shape} != image {volume.array.shape}")
    modality = cfg.modality if cfg.modality != "auto" else DEFAULT_MODALITY.get(cfg.dataset, "mri")
    array, _ = preprocess_volume(volume, modality=modality, target_spacing=cfg.target_spacing,
                                 hu_window_name=cfg.hu_window, percentiles=tuple(cfg.intensity_percentiles))
    seg, _ = _resample_label(seg_vol, cfg)
    channels = seg_channels(seg, array)
    if spatial_dims == 3:
        img, msk = _volume_pair(array, channels, cfg)
        return img[None, None], np.asarray([int(msk[1:].any())], np.int64), msk[None]
    axis = cfg.slice_axis
    slices, labels, kept = extract_slices(array, axis=axis, min_foreground=cfg.min_foreground, image_size=cfg.image_size,
                                          threshold=FOREGROUND, label_volume=seg)
    box = foreground_bbox(array, threshold=FOREGROUND)
    boxed = channels[(slice(None),) + box]
    masks = [fit_mask_to_size(np.ascontiguousarray(np.rot90(np.take(boxed, k - box[axis].start, axis=axis + 1),
                                                            axes=(1, 2))), cfg.image_size) for k in kept]
    empty = np.zeros((0, len(MASK_CHANNELS), cfg.image_size, cfg.image_size), np.uint8)
    return slices, labels, np.stack(masks) if masks else empty


class MaskedVolumeDataset(Dataset):
    """``(image [1, *S] float32 in [-1, 1], label int64, mask [4, *S] uint8)`` items from records
    with segmentations; with ``train`` and ``data.augment``, one random flip/affine moves both."""

    mask_channels = MASK_CHANNELS

    def __init__(self, records: list[Record], cfg: DataConfig, *, spatial_dims: int = 2, train: bool = False):
        loaded = [load_record_with_masks(r, cfg, spatial_dims=spatial_dims) for r in records]
        if not loaded or not sum(len(x[1]) for x in loaded):
            raise DataError("no (image, mask) examples: the records hold no usable slices or volumes")
        self.images = torch.from_numpy(np.concatenate([x[0] for x in loaded]))
        self.labels = torch.from_numpy(np.concatenate([x[1] for x in loaded]))
        self.masks = torch.from_numpy(np.concatenate([x[2] for x in loaded]))
        self.patient_ids = [r.patient_id for r, x in zip(records, loaded) for _ in range(len(x[1]))]  # slices share theirs
        self.augment: Optional[object] = paired_train_augmentation(spatial_dims) if train and cfg.augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x, m = self.images[i], self.masks[i]
        if self.augment is not None:
            out = self.augment({"image": x, "mask": m})
            x, m = torch.as_tensor(out["image"]).clamp(-1.0, 1.0), torch.as_tensor(out["mask"]).round().to(torch.uint8)
        return x, self.labels[i], m
