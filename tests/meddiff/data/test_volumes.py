"""3-D volumes: crop/pad at a target spacing and pseudo-patient cohorts from a template NIfTI."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from configs import load_config
from meddiff.data.adapters import index_dataset
from meddiff.data.records import load_record
from meddiff.data.template import pseudo_patient, write_template_cohort
from meddiff.data.readers import read_nifti
from meddiff.data.transforms import crop_or_pad_volume
from tests.conftest import shared_file
from tests.fixtures import head_volume, write_nifti


def test_crop_or_pad_centres_the_foreground_without_resizing():
    vol = np.full((30, 10, 20), -1.0, np.float32)
    vol[5:25, 2:8, 4:16] = 0.5  # foreground 20 x 6 x 12
    out = crop_or_pad_volume(vol, 16)
    assert out.shape == (16, 16, 16)
    fg = out > -0.95
    assert fg.sum(axis=(1, 2)).nonzero()[0].size == 16  # x: 20 voxels cropped to 16
    assert fg.any(axis=(0, 2)).sum() == 6 and fg.any(axis=(0, 1)).sum() == 12  # y, z: kept whole, padded with -1
    assert out.min() == -1.0 and out.max() == 0.5


def test_template_cohort_in_brats_layout_with_exact_spacing_and_lesion_labels(tmp_path):
    img, _ = head_volume(shape=(40, 48, 36), seed=0, lesion=False)
    template = write_nifti(tmp_path / "template.nii.gz", img, spacing=(2.0, 2.0, 2.0))
    cases = write_template_cohort(template, tmp_path / "cohort", num_patients=4, spacing=4.0, lesion_fraction=0.5, seed=3)
    assert [c.name for c in cases] == [f"BraTS-GLI-{i:05d}-000" for i in range(4)]
    t1c = nib.load(cases[0] / f"{cases[0].name}-t1c.nii.gz")
    assert np.allclose(t1c.header.get_zooms(), 4.0) and nib.aff2axcodes(t1c.affine) == ("R", "A", "S")
    segs = [nib.load(c / f"{c.name}-seg.nii.gz").get_fdata() for c in cases]
    assert any(s.max() > 0 for s in segs) and any(s.max() == 0 for s in segs)  # some with a tumour, some without
    assert set(np.unique(np.concatenate([s.ravel() for s in segs]))) <= {0, 1, 2, 3}
    # deterministic in the seed, and patients differ from each other
    a = pseudo_patient(read_nifti(template), spacing=4.0, seed=11, lesion=False)[0]
    assert np.array_equal(a, pseudo_patient(read_nifti(template), spacing=4.0, seed=11, lesion=False)[0])
    assert not np.array_equal(a, pseudo_patient(read_nifti(template), spacing=4.0, seed=12, lesion=False)[0])
    # the real BraTS adapter reads it: 3-D volumes at the target spacing, labels from the segmentation
    cfg = load_config(None, ["data.dataset=brats", f"data.path={tmp_path / 'cohort'}", "data.image_size=16",
                             "data.target_spacing=[4,4,4]", f"data.cache_dir={tmp_path / 'cache'}"]).data
    index = index_dataset(cfg)
    volumes = [load_record(r, cfg, spatial_dims=3) for r in index.records]
    assert all(v.shape == (1, 1, 16, 16, 16) and -1 <= v.min() and v.max() <= 1 for v, _ in volumes)
    assert [int(lab[0]) for _, lab in volumes] == [int(s.max() > 0) for s in segs]
    with pytest.raises(ValueError, match="num_patients must be >= 1"):
        write_template_cohort(template, tmp_path / "x", num_patients=0)


def test_cohort_from_the_real_mni152_brain(tmp_path):
    template = shared_file("mni152_t1_1mm.nii.gz")
    cases = write_template_cohort(template, tmp_path / "mni", num_patients=2, spacing=6.0, lesion_fraction=1.0, seed=0)
    vol = nib.load(cases[0] / f"{cases[0].name}-t1n.nii.gz")
    assert vol.shape == (34, 40, 33)  # the template's 196 x 232 x 188 mm field of view at 6 mm, voxel centres
    seg = nib.load(cases[0] / f"{cases[0].name}-seg.nii.gz").get_fdata()
    data = vol.get_fdata()
    assert seg.max() > 0 and data[seg == 1].mean() < data[(seg == 0) & (data > 0.5 * data.max())].mean()  # dark necrotic core


def test_ixi_volumes_resampled_and_cropped_for_3d(tmp_path):
    from tests.fixtures import make_ixi

    root = make_ixi(tmp_path / "ixi")  # 20 x 24 x 16 voxels at 1.2 x 0.94 x 0.94 mm
    cfg = load_config(None, ["data.dataset=ixi", f"data.path={root}", "data.image_size=16", "data.target_spacing=[2,2,2]",
                             f"data.cache_dir={tmp_path / 'cache'}"]).data
    record = index_dataset(cfg).records[0]
    vol, label = load_record(record, cfg, spatial_dims=3)
    assert vol.shape == (1, 1, 16, 16, 16) and label.tolist() == [0]
    assert (vol > -0.95).mean() < 0.5  # at 2 mm the head fills only part of the 16^3 cube: padded, not stretched


def test_grids_show_volumes_by_their_middle_axial_slice_anterior_up():
    from meddiff.outputs import image_grid

    vol = -np.ones((1, 1, 4, 6, 8), np.float32)  # [N, C, X (left-right), Y (posterior-anterior), Z (inferior-superior)]
    vol[0, 0, 1, 5, 4] = 1.0  # most anterior row, middle axial slice
    grid = image_grid(vol, pad=0)
    assert grid.shape == (6, 4)  # Y up the page, X across
    assert np.argwhere(grid == 255).tolist() == [[0, 1]]  # anterior at the top


def _t1_and_t2(case):
    t1, t2 = (nib.load(case / f"{case.name}-{s}.nii.gz") for s in ("t1n", "t2w"))
    return t1, t2


def test_template_cohort_writes_a_t2w_sequence_on_the_t1_grid_when_asked(tmp_path):
    img, _ = head_volume(shape=(40, 48, 36), seed=0, lesion=False)
    template = write_nifti(tmp_path / "template.nii.gz", img, spacing=(2.0, 2.0, 2.0))
    plain = write_template_cohort(template, tmp_path / "plain", num_patients=2, spacing=4.0, lesion_fraction=1.0, seed=3)
    cases = write_template_cohort(template, tmp_path / "cohort", num_patients=2, spacing=4.0, lesion_fraction=1.0,
                                  seed=3, t2w=True)
    assert not (plain[0] / f"{plain[0].name}-t2w.nii.gz").exists()
    for case, before in zip(cases, plain):
        t1, t2 = _t1_and_t2(case)
        assert t2.shape == t1.shape and np.array_equal(t2.affine, t1.affine)
        for s in ("t1n", "t1c", "seg"):  # asking for t2w changes none of the other files
            same = [nib.load(c / f"{c.name}-{s}.nii.gz").get_fdata() for c in (case, before)]
            assert np.array_equal(*same)
    # the BraTS adapter finds the second sequence by its BraTS name
    cfg = load_config(None, ["data.dataset=brats", f"data.path={tmp_path / 'cohort'}", "data.sequence=t2w"]).data
    assert [Path(r.files[0]).name for r in index_dataset(cfg).records] == [f"{c.name}-t2w.nii.gz" for c in cases]


def test_mni152_cohort_t2w_has_the_t1_affine_and_shape_and_inverted_contrast(tmp_path):
    template = shared_file("mni152_t1_1mm.nii.gz")  # skips, naming the path, when ../shared/data is absent
    case = write_template_cohort(template, tmp_path / "mni", num_patients=1, spacing=6.0, lesion_fraction=1.0, seed=0,
                                 t2w=True)[0]
    t1, t2 = _t1_and_t2(case)
    assert t2.shape == t1.shape == (34, 40, 33) and np.array_equal(t2.affine, t1.affine)
    a, b = t1.get_fdata(), t2.get_fdata()
    seg = nib.load(case / f"{case.name}-seg.nii.gz").get_fdata()
    peak = np.percentile(a, 99.5)
    brain = (seg == 0) & (a > 0.2 * peak)
    assert np.corrcoef(a[brain], b[brain])[0, 1] < -0.5  # bright T1 white matter is dark on T2, dark CSF bright
    assert b[seg == 2].mean() > b[brain].mean() and b[seg == 1].mean() > b[brain].mean()  # bright oedema and core
    assert (b[a == 0] == 0).all()  # outside the head stays background
