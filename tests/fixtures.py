"""Tiny datasets written in the true formats and names (nibabel, pydicom, PIL)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image


def head_volume(shape=(20, 24, 16), seed=0, lesion=True):
    """An ellipsoid 'head' with brighter core; returns (image, seg) arrays."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    img = np.where(r < 0.8, 300.0, 0.0) + np.where(r < 0.5, 400.0, 0.0) + rng.normal(0, 5, shape)
    img = np.clip(img, 0, None).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    if lesion:
        seg[(np.abs(grid[0] - 0.2) < 0.2) & (np.abs(grid[1]) < 0.2) & (np.abs(grid[2] - 0.3) < 0.25)] = 1
    return img, seg


def write_nifti(path: Path, array, spacing=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0])), str(path))
    return path


def make_brats(root: Path, n_cases=3, sequences=("t1n", "t1c", "t2w", "t2f")):
    for i in range(n_cases):
        case = f"BraTS-GLI-{i:05d}-000"
        img, seg = head_volume(seed=i, lesion=True)
        for s in sequences:
            write_nifti(root / case / f"{case}-{s}.nii.gz", img)
        write_nifti(root / case / f"{case}-seg.nii.gz", seg)
    return root


def make_ixi(root: Path):
    names = []
    for i, hosp in enumerate(["Guys", "Guys", "HH", "HH", "IOP", "IOP"]):
        for contrast in ("T1", "T2"):
            name = f"IXI{i + 2:03d}-{hosp}-{800 + i:04d}-{contrast}.nii.gz"
            write_nifti(root / name, head_volume(seed=i, lesion=False)[0], spacing=(1.2, 0.94, 0.94))
            names.append(name)
    return root


def make_dicom_series(folder: Path, n_slices=6, slope=2.0, intercept=-1024.0, shuffle=True, rows=16, cols=12, order=None,
                      orientation=(1, 0, 0, 0, 1, 0), origin=(0.0, 0.0, 0.0), spacing=(0.7, 0.7)):
    """A CT series: stored value v means HU = v * slope + intercept; slice k has HU = 100 * k.

    Slice k lies at ``origin + 2.5 * k * normal``. ``order`` lists which slice each file (by
    name) holds; by default even slices come first (``shuffle``) or the spatial order.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    if order is None:
        order = list(range(n_slices))
        order = order[::2] + order[1::2] if shuffle else order
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    for file_no, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = 2.5
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + 2.5 * k * normal]
        ds.InstanceNumber = file_no + 1  # deliberately not the spatial order
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        hu = np.full((rows, cols), 100.0 * k)
        ds.PixelData = np.round((hu - intercept) / slope).astype(np.uint16).tobytes()
        ds.save_as(str(folder / f"{file_no:03d}.dcm"), enforce_file_format=True)
    return folder


def write_png(path: Path, seed=0, size=20, jpeg=False):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path, format="JPEG" if jpeg else "PNG")
    return path


def make_chexpert(root: Path):
    rows = []
    for p in range(4):
        for study in (1, 2):
            rel = f"CheXpert-v1.0-small/train/patient{p:05d}/study{study}/view1_frontal.jpg"
            write_png(root / "train" / f"patient{p:05d}" / f"study{study}" / "view1_frontal.jpg", seed=p * 10 + study, jpeg=True)
            rows.append({"Path": rel, "Sex": "F", "Pneumonia": ["1.0", "", "-1.0", "0.0"][p], "Edema": ""})
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["Path", "Sex", "Pneumonia", "Edema"])
        w.writeheader()
        w.writerows(rows)
    return root


def make_covid_ct(root: Path):
    for folder in ("CT_COVID", "CT_NonCOVID"):
        for scan in range(3):
            for sl in range(2):
                write_png(root / folder / f"scan{scan}_{sl}.png", seed=scan * 3 + sl)
    return root
