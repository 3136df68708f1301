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
    ds0 = slices[0][0]
    orient = np.asarray(getattr(ds0, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    row, col = orient[:3], orient[3:]
    normal = np.cross(row, col)

    def position(item):
        ds = item[0]
        if hasattr(ds, "ImagePositionPatient"):
            return float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal))
        return float(getattr(ds, "InstanceNumber", 0))

    slices.sort(key=position)
    volume = np.stack([s[1].T for s in slices], axis=-1)  # [cols(x), rows(y), slices(z)]
    spacing_xy = [float(v) for v in getattr(ds0, "PixelSpacing", [1.0, 1.0])]
    positions = [position(s) for s in slices]
    dz = float(np.median(np.diff(positions))) if len(positions) > 1 else float(getattr(ds0, "SliceThickness", 1.0))
    if len(positions) > 1 and dz == 0:
        raise DataError(f"{folder}: several slices share one position; is this more than one series?")
    origin = np.asarray(getattr(ds0, "ImagePositionPatient", [0, 0, 0]), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing_xy[1]  # column index runs along the row direction
    lps[:3, 1] = col * spacing_xy[0]
    lps[:3, 2] = normal * dz
    lps[:3, 3] = origin
    to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return Volume(array=volume.astype(np.float32), affine=to_ras @ lps, source=str(folder))


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
