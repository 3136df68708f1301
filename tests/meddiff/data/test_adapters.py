import csv
import os

import numpy as np
import pytest

from configs import load_config
from meddiff.data.adapters import index_dataset
from meddiff.data.records import load_record
from meddiff.data.cache import ArrayCache, MedicalDataset
from meddiff.data.readers import DataError
from tests.fixtures import make_brats, make_chexpert, make_covid_ct, make_dicom_series, make_ixi, write_nifti, write_png


def cfg(dataset, path, *extra):
    return load_config(None, [f"data.dataset={dataset}", f"data.path={path}", "data.image_size=16",
                              "data.min_foreground=0.05", *extra]).data


def test_brats_slices_with_tumour_labels_from_seg(tmp_path):
    root = make_brats(tmp_path / "brats")
    c = cfg("brats", root, "data.sequence=t2f", f"data.cache_dir={tmp_path / 'cache'}")
    index = index_dataset(c)
    assert [r.patient_id for r in index.records] == ["BraTS-GLI-00000", "BraTS-GLI-00001", "BraTS-GLI-00002"]
    assert index.records[0].files[0].endswith("-t2f.nii.gz")
    slices, labels = load_record(index.records[0], c)
    assert slices.shape[1:] == (1, 16, 16) and slices.dtype == np.float32
    assert -1 <= slices.min() and slices.max() <= 1
    assert 0 < labels.sum() < len(labels)  # some slices have tumour, some not
    vol, vlab = load_record(index.records[0], c, spatial_dims=3)
    assert vol.shape == (1, 1, 16, 16, 16) and vlab.tolist() == [1]


def test_brats_bad_input(tmp_path):
    root = make_brats(tmp_path / "brats", n_cases=2)
    os.remove(root / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t1c.nii.gz")
    with pytest.raises(DataError, match=r"BraTS-GLI-00001-000: missing modality file\(s\) \['BraTS-GLI-00001-000-t1c.nii.gz'\]"):
        index_dataset(cfg("brats", root))
    index = index_dataset(cfg("brats", root, "data.skip_bad=true"))
    assert len(index.records) == 1 and len(index.bad) == 1
    # mismatched segmentation shape
    case = root / "BraTS-GLI-00000-000"
    write_nifti(case / "BraTS-GLI-00000-000-seg.nii.gz", np.zeros((5, 5, 5), np.uint8))
    with pytest.raises(DataError, match="segmentation shape .* does not match image shape"):
        load_record(index.records[0], cfg("brats", root))
    with pytest.raises(DataError, match="data.path is empty"):
        index_dataset(cfg("brats", ""))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no BraTS case folders"):
        index_dataset(cfg("brats", tmp_path / "empty"))


def test_ixi_hospital_is_the_natural_site(tmp_path):
    root = make_ixi(tmp_path / "ixi")
    index = index_dataset(cfg("ixi", root))
    assert len(index.records) == 6  # T1 only
    assert [r.meta["site"] for r in index.records] == ["Guys", "Guys", "HH", "HH", "IOP", "IOP"]
    assert index.records[0].patient_id == "IXI002"
    assert len(index_dataset(cfg("ixi", root, "data.sequence=T2")).records) == 6
    (root / "IXI999-Nowhere-1-T1.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError, match="IXI999-Nowhere-1-T1.nii.gz: name does not follow"):
        index_dataset(cfg("ixi", root))


def test_chexpert_csv_and_uncertain_policy(tmp_path):
    root = make_chexpert(tmp_path / "chexpert")
    zeros = index_dataset(cfg("chexpert", root))
    assert len(zeros.records) == 8
    labels = {r.patient_id: r.label for r in zeros.records}
    assert labels == {"patient00000": 1, "patient00001": 0, "patient00002": 0, "patient00003": 0}
    ones = {r.patient_id: r.label for r in index_dataset(cfg("chexpert", root, "data.uncertain_policy=ones")).records}
    assert ones["patient00002"] == 1
    ignore = index_dataset(cfg("chexpert", root, "data.uncertain_policy=ignore"))
    assert {r.patient_id for r in ignore.records} == {"patient00000", "patient00001", "patient00003"}
    img, lab = load_record(zeros.records[0], cfg("chexpert", root))
    assert img.shape == (1, 1, 16, 16)


def test_chexpert_bad_rows(tmp_path):
    root = make_chexpert(tmp_path / "c")
    rows = list(csv.DictReader(open(root / "train.csv")))
    rows[0]["Path"] = "CheXpert-v1.0-small/train/patient09999/study1/view1_frontal.jpg"
    rows[1]["Pneumonia"] = "2.0"
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DataError, match=r"train.csv:2: image .*patient09999.* not found"):
        index_dataset(cfg("chexpert", root))
    index = index_dataset(cfg("chexpert", root, "data.skip_bad=true"))
    assert len(index.bad) == 2 and any("unknown label value '2.0'" in b for b in index.bad)
    with pytest.raises(DataError, match="needs columns 'Path' and 'Atelectasis'"):
        index_dataset(cfg("chexpert", root, "data.finding=Atelectasis"))


def test_covid_ct_folders(tmp_path):
    root = make_covid_ct(tmp_path / "covid")
    index = index_dataset(cfg("covid_ct", root))
    assert len(index.records) == 12
    assert sorted({r.label for r in index.records}) == [0, 1]
    assert len({r.patient_id for r in index.records}) == 6  # two slices per scan share a patient
    (root / "CT_NonCOVID").rename(root / "other")
    with pytest.raises(DataError, match="missing folder CT_NonCOVID/"):
        index_dataset(cfg("covid_ct", root))


def test_lidc_dicom_series_in_hu(tmp_path):
    root = tmp_path / "lidc"
    for p in range(2):
        make_dicom_series(root / f"LIDC-IDRI-{p:04d}" / "study" / "series", n_slices=8)
    index = index_dataset(cfg("lidc", root, "data.hu_window=abdomen", "data.min_foreground=0.0"))
    assert [r.patient_id for r in index.records] == ["LIDC-IDRI-0000", "LIDC-IDRI-0001"]
    slices, labels = load_record(index.records[0], cfg("lidc", root, "data.hu_window=abdomen", "data.min_foreground=0.0"))
    assert slices.ndim == 4 and np.isfinite(slices).all()


def test_generic_folder_with_csv(tmp_path):
    root = tmp_path / "folder"
    write_nifti(root / "a.nii.gz", np.random.default_rng(0).random((8, 8, 8)).astype(np.float32))
    write_png(root / "b.png")
    table = tmp_path / "labels.csv"
    table.write_text("path,label,patient_id,site\na.nii.gz,1,p1,x\nb.png,0,p2,y\n")
    index = index_dataset(cfg("folder", root, f"data.labels_csv={table}"))
    assert [(r.kind, r.label, r.patient_id, r.meta["site"]) for r in index.records] == [("volume", 1, "p1", "x"), ("image", 0, "p2", "y")]
    table.write_text("path,label\nmissing.png,0\n")
    with pytest.raises(DataError, match=r"labels.csv:2: file 'missing.png' not found"):
        index_dataset(cfg("folder", root, f"data.labels_csv={table}"))
    table.write_text("path,label\nb.png,sick\n")
    with pytest.raises(DataError, match=r"labels.csv:2: unknown label value 'sick'"):
        index_dataset(cfg("folder", root, f"data.labels_csv={table}"))
    # with skip_bad the row is logged, counted and left out; the run goes on with the others
    table.write_text("path,label\nb.png,sick\na.nii.gz,1\n")
    index = index_dataset(cfg("folder", root, f"data.labels_csv={table}", "data.skip_bad=true"))
    assert [r.sample_id for r in index.records] == ["a.nii.gz"] and "labels.csv:2: unknown label value 'sick'" in index.bad[0]


def test_cache_hits_memory_maps_and_invalidates(tmp_path):
    root = make_brats(tmp_path / "brats", n_cases=2)
    c = cfg("brats", root, f"data.cache_dir={tmp_path / 'cache'}")
    records = index_dataset(c).records
    first = MedicalDataset(records, c)
    assert first.cache.misses == 2 and first.cache.hits == 0 and len(first) > 0
    second = MedicalDataset(records, c)
    assert second.cache.hits == 2 and second.cache.misses == 0
    assert isinstance(second._chunks[0], np.memmap)
    x, y = second[0]
    assert x.shape == (1, 16, 16)
    np.testing.assert_array_equal(first[3][0].numpy(), second[3][0].numpy())
    # a config change invalidates
    c2 = cfg("brats", root, f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=8", "model.attention_resolutions=[4]")
    assert MedicalDataset(records, c2).cache.misses == 2
    # a file change invalidates
    f = records[0].files[0]
    write_nifti(root / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1c.nii.gz", np.zeros((20, 24, 16), np.float32) + 5)
    os.utime(f, ns=(1, 1))
    third = MedicalDataset(records, c)
    assert third.cache.misses == 1 and third.cache.hits == 1


def test_skip_bad_at_load_time(tmp_path):
    root = make_brats(tmp_path / "brats", n_cases=2)
    f = root / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t1c.nii.gz"
    f.write_bytes(f.read_bytes()[:100])
    records = index_dataset(cfg("brats", root)).records
    with pytest.raises(DataError, match="BraTS-GLI-00001-000-t1c.nii.gz: corrupt"):
        MedicalDataset(records, cfg("brats", root, f"data.cache_dir={tmp_path / 'c'}"))
    ds = MedicalDataset(records, cfg("brats", root, "data.skip_bad=true", f"data.cache_dir={tmp_path / 'c'}"))
    assert len(ds.bad) == 1 and len(ds) > 0
