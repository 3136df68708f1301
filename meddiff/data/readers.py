"""Low-level readers for medical formats: NIfTI (nibabel), DICOM series (pydicom), 2-D images (PIL).

Every error names the file and the problem; a corrupt file raises :class:`DataError`, never a
bare library exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


class DataError(ValueError):
    """A data file or folder that cannot be used; the message names it and the problem."""


@dataclass
class Volume:
    """A 3-D array with its voxel-to-world (RAS, mm) affine.

    Attributes:
        array: ``[X, Y, Z]`` float32 in the file's voxel order.
        affine: ``[4, 4]`` voxel-to-world matrix.
        source: the file or folder read.
    """

    array: np.ndarray
    affine: np.ndarray
    source: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(3))


def read_nifti(path: str | Path) -> Volume:
    """Read a ``.nii``/``.nii.gz`` volume (the first 3 dimensions; 4-D files take volume 0)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: NIfTI file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated gzip, bad header, ...
        raise DataError(f"{path}: corrupt or unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf voxels")
    return Volume(array=data, affine=np.asarray(img.affine, dtype=np.float64), source=str(path))


def read_dicom_series(folder: str | Path) -> Volume:
    """Read one DICOM series as a Hounsfield-unit volume.

    Slices are sorted by their position along the slice normal (``ImagePositionPatient`` projected
    on the cross product of the ``ImageOrientationPatient`` row/column cosines), falling back to
    ``InstanceNumber``. Stored values become HU as ``value * RescaleSlope + RescaleIntercept``
    (DICOM PS3.3 C.11.1.1.2), per slice.

    Returns:
        a :class:`Volume` ``[rows, cols, slices]`` with a LPS->RAS converted affine.
    """
    import pydicom

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []
    if not files:
        raise DataError(f"{folder}: no DICOM files in this folder")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise DataError(f"{f}: corrupt or unreadable DICOM ({type(exc).__name__}: {exc})") from None
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        intercept = float(getattr(ds, "RescaleIntercept", 0.0))
        slices.append((ds, pixels * slope + intercept, f))
    shapes = {s[1].shape for s in slices}
    if len(shapes) != 1:
        raise DataError(f"{folder}: slices have different shapes {sorted(shapes)}")
    orient = np.asarray(getattr(slices[0][0], "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    row, col = orient[:3], orient[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda item: _slice_position(item[0], normal))
    volume = np.stack([s[1].T for s in slices], axis=-1)  # [cols(x), rows(y), slices(z)]
    return Volume(array=volume.astype(np.float32), affine=_dicom_affine([s[0] for s in slices], row, col, normal),
                  source=str(folder))


def _slice_position(ds, normal: np.ndarray) -> float:
    """Position of a slice along the slice normal (``InstanceNumber`` when it has no position)."""
    if hasattr(ds, "ImagePositionPatient"):
        return float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal))
    return float(getattr(ds, "InstanceNumber", 0))


def _dicom_affine(ordered: list, row: np.ndarray, col: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Voxel ``(i, j, k)`` -> RAS mm for slices sorted along their normal.

    DICOM PS3.3 C.7.6.2.1.1: ``P = S_1 + i * X * dc + j * Y * dr + k * (S_N - S_1) / (N - 1)``, with
    ``X``/``Y`` the row/column direction cosines of ``ImageOrientationPatient``, ``dc``/``dr`` the
    column and row spacing (``PixelSpacing[1]``, ``PixelSpacing[0]``) and ``S_k`` the
    ``ImagePositionPatient`` of the k-th slice in space; then LPS -> RAS (negate x and y).
    """
    first = ordered[0]
    spacing_xy = [float(v) for v in getattr(first, "PixelSpacing", [1.0, 1.0])]
    positions = [_slice_position(ds, normal) for ds in ordered]
    origin = np.asarray(getattr(first, "ImagePositionPatient", [0, 0, 0]), dtype=np.float64)
    if len(ordered) > 1 and all(hasattr(ds, "ImagePositionPatient") for ds in ordered):
        last = np.asarray(ordered[-1].ImagePositionPatient, dtype=np.float64)
        step = (last - origin) / (len(ordered) - 1)
        if np.allclose(step, 0) or len(set(positions)) < len(positions):
            raise DataError(f"{first.filename}: several slices share one position; is this more than one series?")
    else:
        step = normal * float(getattr(first, "SliceThickness", 1.0))
    lps = np.eye(4)
    lps[:3, 0] = row * spacing_xy[1]  # the column index i runs along the row direction
    lps[:3, 1] = col * spacing_xy[0]
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def read_image(path: str | Path, *, channels: int = 1) -> np.ndarray:
    """Read a 2-D PNG/JPEG as ``[channels, H, W]`` float32 in [0, 1]."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except Exception as exc:
        raise DataError(f"{path}: corrupt or unreadable image ({type(exc).__name__}: {exc})") from None
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def file_digest(paths: Sequence[str | Path], *, chunk: int = 1 << 20) -> str:
    """SHA-256 over the bytes of ``paths`` (in order); the content hash used in manifests and the cache."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(chunk):
                    h.update(block)
    return h.hexdigest()
