"""Folder CSVs of translation pairs (``source,target[,label][,patient_id][,site]``): NIfTI and
DICOM series scans, CT targets kept in HU, alignment, and the errors naming the row and the files."""

import nibabel as nib
import numpy as np
import pytest
import torch

from meddiff.data.adapters import index_dataset
from meddiff.data.paired import model_to_hu
from meddiff.data.readers import DataError, read_dicom_series
from meddiff.recipes.sites import records_dataset
from meddiff.recipes.translation_data import build_paired_dataset
from tests.conftest import tiny_config
from tests.fixtures import make_dicom_series, write_nifti

SHAPE = (20, 24, 16)


def _mr_and_ct(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An MR-like head and its CT in HU, with one bright block at the same voxels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    head = np.sqrt((grid ** 2).sum(0)) < 0.8
    mr = np.where(head, 300.0, 0.0) + rng.normal(0, 3, SHAPE)
    ct = np.where(head, 40.0, -1000.0)
    mr[8:12, 10:14, :], ct[8:12, 10:14, :] = 900.0, 1000.0  # the structure drawn in both
    return mr.astype(np.float32), ct.astype(np.float32)


def _write_pairs(root, n=3, extra_rows=()):
    rows = ["source,target,label,patient_id,site"]
    for i in range(n):
        mr, ct = _mr_and_ct(i)
        write_nifti(root / f"p{i}" / "t1.nii.gz", mr)
        write_nifti(root / f"p{i}" / "ct.nii.gz", ct)
        rows.append(f"p{i}/t1.nii.gz,p{i}/ct.nii.gz,{i % 2},patient{i},site_{i % 2}")
    (root / "pairs.csv").write_text("\n".join([*rows, *extra_rows]) + "\n")
    return root / "pairs.csv"


def _config(root, table, extra=()):
    return tiny_config(None, ["data.dataset=folder", f"data.path={root}", f"data.labels_csv={table}",
                              "data.source_sequence=t1", "data.target_sequence=ct", "data.min_foreground=0.05", *extra])


def test_folder_pairs_are_indexed_with_patient_site_and_target(tmp_path):
    cfg = _config(tmp_path, _write_pairs(tmp_path))
    records = index_dataset(cfg.data).records
    assert [r.patient_id for r in records] == ["patient0", "patient1", "patient2"]
    assert [r.meta["site"] for r in records] == ["site_0", "site_1", "site_0"] and [r.label for r in records] == [0, 1, 0]
    assert all(r.meta["target"].endswith("ct.nii.gz") and r.files[0].endswith("t1.nii.gz") for r in records)


def test_folder_pairs_stay_aligned_and_the_ct_target_stays_in_hu(tmp_path):
    cfg = _config(tmp_path, _write_pairs(tmp_path))
    data = build_paired_dataset(cfg)
    assert len(data) > 10
    for i in range(len(data)):
        x0, _ = data[i]
        target, source = x0[0], x0[1]
        hu = model_to_hu(target)
        assert torch.equal(hu > 900, source > 0.9) and (hu > 900).any()  # the block, at the same pixels in both
        assert hu.min() >= -1000.0 - 1e-3 and hu.max() <= 1000.0 + 1e-3  # HU, linearly mapped (no MR normalisation)


def test_a_dicom_series_target_is_read_in_hu_and_aligned_with_a_nifti_stored_in_another_axis_order(tmp_path):
    series = make_dicom_series(tmp_path / "p0" / "ct", n_slices=6, rows=24, cols=20, shuffle=True)
    vol = read_dicom_series(series)
    mr = np.where(np.ones(vol.array.shape, bool), 200.0, 0.0).astype(np.float32)
    mr[:, :, 2] = 0.0  # one empty slice, dropped by min_foreground
    flip_z = np.eye(4)
    flip_z[2, 2], flip_z[2, 3] = -1.0, mr.shape[2] - 1  # the same grid, its slices stored in the other order
    nib.save(nib.Nifti1Image(mr[:, :, ::-1].copy(), vol.affine @ flip_z), str(tmp_path / "p0" / "t1.nii.gz"))
    (tmp_path / "pairs.csv").write_text("source,target\np0/t1.nii.gz,p0/ct\n")
    cfg = _config(tmp_path, tmp_path / "pairs.csv", ["data.image_size=16"])
    data = records_dataset(index_dataset(cfg.data).records, cfg, train=False)
    slice_hu = sorted(float(model_to_hu(data[i][0][0, 8, 8])) for i in range(len(data)))  # centre pixels
    assert slice_hu == pytest.approx([0.0, 100.0, 300.0, 400.0, 500.0], abs=1e-2)  # slice k holds 100 k HU; 2 dropped


def test_bad_rows_name_the_csv_row_and_the_file(tmp_path):
    table = _write_pairs(tmp_path, n=1, extra_rows=["p0/t1.nii.gz,p9/ct.nii.gz,0,x,site_0"])
    with pytest.raises(DataError, match=r"pairs.csv:3: target 'p9/ct.nii.gz' not found"):
        index_dataset(_config(tmp_path, table).data)
    cfg = _config(tmp_path, table, ["data.skip_bad=true"])
    result = index_dataset(cfg.data)
    assert len(result.records) == 1 and len(result.bad) == 1


def test_a_pair_on_different_grids_is_refused_naming_both_files(tmp_path):
    table = _write_pairs(tmp_path, n=1)
    write_nifti(tmp_path / "p0" / "ct.nii.gz", _mr_and_ct(0)[1], spacing=(1.0, 1.0, 2.0))  # same shape, other affine
    cfg = _config(tmp_path, table)
    with pytest.raises(DataError, match=r"p0/t1.nii.gz and .*p0/ct.nii.gz: source and target are on different grids"):
        build_paired_dataset(cfg)


def test_a_single_image_csv_in_a_translation_study_says_what_is_needed(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", _mr_and_ct(0)[0])
    (tmp_path / "labels.csv").write_text("path,label\na.nii.gz,0\n")
    with pytest.raises(DataError, match="reads a CSV with 'source' and 'target' columns"):
        build_paired_dataset(_config(tmp_path, tmp_path / "labels.csv"))
