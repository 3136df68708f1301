"""A content-addressed cache of preprocessed arrays, memory-mapped on reuse.

Key = SHA-256 of (meddiff version, the preprocessing fields of the data config, the model's
spatial dims, the record's kind and metadata, and the *bytes* of its source files). Changing a
file or a preprocessing setting therefore gives a new key; the old entry is simply not used.
Entries are ``<key>.images.npy`` / ``<key>.labels.npy``, written atomically, then opened with
``np.load(mmap_mode="r")`` so training rounds never re-read NIfTI or DICOM files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import meddiff
from configs import DataConfig
from meddiff.data.records import Record, load_record, npz_images
from meddiff.data.readers import DataError, file_digest

log = logging.getLogger(__name__)

#: DataConfig fields that change preprocessed pixels.
PREPROCESS_FIELDS = ("dataset", "image_size", "modality", "sequence", "target_spacing", "hu_window",
                     "intensity_percentiles", "min_foreground", "slice_axis")


@lru_cache(maxsize=65536)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return file_digest([path])


def content_digest(record: Record) -> str:
    """SHA-256 of a record's source bytes (memoised per path, size and mtime)."""
    parts = []
    for f in record.files + tuple(record.meta[k] for k in ("seg", "target") if k in record.meta):
        p = Path(f)
        if p.is_dir():
            parts.append(file_digest([p]))
        else:
            st = p.stat()
            parts.append(_digest(str(p), st.st_size, st.st_mtime_ns))
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def preprocess_key(record: Record, cfg: DataConfig, spatial_dims: int) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k in PREPROCESS_FIELDS}
    payload = json.dumps({"version": meddiff.__version__, "settings": settings, "spatial_dims": spatial_dims,
                          "kind": record.kind, "meta": {k: v for k, v in sorted(record.meta.items()) if k != "seg"},
                          "content": content_digest(record)}, sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()


class ArrayCache:
    """Preprocessed arrays on disk, keyed by :func:`preprocess_key`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.images.npy", d / f"{key}.labels.npy"

    def get(self, record: Record, cfg: DataConfig, *, spatial_dims: int) -> tuple[np.ndarray, np.ndarray]:
        key = preprocess_key(record, cfg, spatial_dims)
        img_path, lab_path = self._paths(key)
        if img_path.is_file() and lab_path.is_file():
            self.hits += 1
            return np.load(img_path, mmap_mode="r"), np.load(lab_path)
        self.misses += 1
        images, labels = load_record(record, cfg, spatial_dims=spatial_dims)
        img_path.parent.mkdir(parents=True, exist_ok=True)
        for path, arr in ((lab_path, labels), (img_path, images)):  # images last: their presence marks completion
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, np.ascontiguousarray(arr))
            os.replace(tmp, path)
        return np.load(img_path, mmap_mode="r"), labels


class MedicalDataset(Dataset):
    """``(image [1, *S] float32 in [-1, 1], label int64)`` items from indexed records.

    Volumes and images go through :class:`ArrayCache`; MedMNIST records are sliced straight from
    the in-memory ``.npz``. With ``cfg.skip_bad`` a record that fails to load is logged, counted in
    ``self.bad`` and left out; otherwise the :class:`DataError` (naming the file) propagates.
    """

    def __init__(self, records: list[Record], cfg: DataConfig, *, spatial_dims: int = 2, train: bool = False,
                 cache: ArrayCache | None = None):
        self.cfg = cfg
        self.cache = cache or ArrayCache(cfg.cache_dir)
        self.bad: list[str] = []
        self._chunks: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.sample_ids: list[str] = []
        self.patient_ids: list[str] = []  # the patient of each item: a volume's slices share their record's
        npz = [r for r in records if r.kind == "npz"]
        if npz:
            self._chunks.append(npz_images(npz, cfg.image_size))
            self._labels.append(np.asarray([r.label for r in npz], np.int64))
            self.sample_ids += [r.sample_id for r in npz]
            self.patient_ids += [r.patient_id for r in npz]
        for r in records:
            if r.kind == "npz":
                continue
            try:
                images, labels = self.cache.get(r, cfg, spatial_dims=spatial_dims)
            except DataError as exc:
                if not cfg.skip_bad:
                    raise
                log.warning("skipping %s: %s", r.sample_id, exc)
                self.bad.append(str(exc))
                continue
            self._chunks.append(images)
            self._labels.append(labels)
            self.sample_ids += [f"{r.sample_id}#{i}" for i in range(len(labels))]
            self.patient_ids += [r.patient_id] * len(labels)
        counts = [len(lab) for lab in self._labels]
        self._offsets = np.cumsum([0] + counts)
        self.labels = torch.from_numpy(np.concatenate(self._labels)) if self._labels else torch.zeros(0, dtype=torch.long)
        self.augment = None
        if train and cfg.augment:
            # loaded on demand: MONAI's transforms cost a second to import, and only augmented training needs them
            from meddiff.data.transforms import train_augmentation

            self.augment = train_augmentation(spatial_dims)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int):
        c = int(np.searchsorted(self._offsets, i, side="right") - 1)
        x = torch.from_numpy(np.array(self._chunks[c][i - self._offsets[c]], dtype=np.float32))
        if self.augment is not None:
            x = torch.as_tensor(self.augment(x)).clamp_(-1.0, 1.0)
        return x, self.labels[i]
