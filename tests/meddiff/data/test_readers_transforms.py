import gzip

import numpy as np
import pytest
import torch

from meddiff.data.readers import DataError, read_dicom_series, read_image, read_nifti
from meddiff.data.transforms import (
    HU_WINDOWS,
    extract_slices,
    fit_to_size,
    hu_window,
    percentile_normalise,
    preprocess_volume,
    train_augmentation,
    window_by_name,
)
from tests.conftest import shared_file
from tests.fixtures import head_volume, make_dicom_series, write_nifti, write_png


def test_ct_brain_window_golden_values():
    out = window_by_name(torch.tensor([-1000.0, 40.0, 1000.0, 0.0, 80.0]), "brain")
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.0, 1.0, -1.0, 1.0]))
    assert HU_WINDOWS["lung"] == (-600.0, 1500.0)
    # the window applies to raw HU: -600 HU is the lung window's centre
    assert float(hu_window(torch.tensor([-600.0]), center=-600, width=1500)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown HU window"):
        window_by_name(torch.zeros(1), "liver")


def test_percentile_normalisation_maps_to_minus_one_one():
    x = torch.linspace(0, 1000, 1001)
    y = percentile_normalise(x, lower=1, upper=99)
    assert float(y.min()) == -1.0 and float(y.max()) == 1.0
    assert float(y[500]) == pytest.approx(0.0, abs=1e-3)


def test_real_mni152_orientation_resampling_and_slices():
    vol = read_nifti(shared_file("mni152_t1_1mm.nii.gz"))
    assert vol.array.shape == (197, 233, 189) and vol.spacing == (1.0, 1.0, 1.0)
    array, affine = preprocess_volume(vol, modality="mri", target_spacing=(2.0, 2.0, 2.0))
    assert array.shape == (99, 117, 95)
    assert np.allclose(np.diag(affine)[:3], 2.0)  # RAS: positive diagonal
    assert array.min() >= -1 and array.max() <= 1
    slices, labels, kept = extract_slices(array, axis=2, min_foreground=0.3, image_size=32)
    assert slices.shape[1:] == (1, 32, 32) and len(slices) == len(kept) == len(labels)
    assert 10 < len(slices) < 95  # near-empty top/bottom slices are skipped
    all_slices, _, _ = extract_slices(array, axis=2, min_foreground=0.0, image_size=32)
    assert len(all_slices) > len(slices)
    assert slices.std() > 0.2


def test_nifti_errors_name_the_file(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", head_volume()[0])
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataError, match="trunc.nii.gz: corrupt or unreadable NIfTI"):
        read_nifti(truncated)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header"))
    with pytest.raises(DataError, match="garbage.nii.gz"):
        read_nifti(garbage)
    with pytest.raises(DataError, match="missing.nii.gz: NIfTI file not found"):
        read_nifti(tmp_path / "missing.nii.gz")
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match="flat.nii.gz: expected a 3-D volume"):
        read_nifti(flat)


def test_dicom_series_sorted_by_position_with_rescale(tmp_path):
    folder = make_dicom_series(tmp_path / "series", n_slices=6, slope=2.0, intercept=-1024.0)
    vol = read_dicom_series(folder)
    assert vol.array.shape == (12, 16, 6)
    # slice k holds HU 100 * k only if sorted by ImagePositionPatient and rescaled
    assert vol.array[0, 0].tolist() == [0.0, 100.0, 200.0, 300.0, 400.0, 500.0]
    assert np.allclose(vol.spacing, (0.7, 0.7, 2.5))


def _lps_of_file_pixel(ds, r: int, c: int) -> np.ndarray:
    """DICOM PS3.3 C.7.6.2.1.1 for one file: ``P = S + c * X * dc + r * Y * dr`` (LPS, mm)."""
    orient = np.asarray(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return np.asarray(ds.ImagePositionPatient, float) + c * orient[:3] * dc + r * orient[3:] * dr


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_dicom_affine_follows_the_standard_whatever_the_file_order(tmp_path, order):
    """Files named against their positions (head to foot) or shuffled: voxel (i, j, k) of the volume
    maps through the affine to the patient position the standard gives for that file's pixel."""
    import pydicom

    n = 5
    files = list(range(n))[::-1] if order == "reversed" else [3, 0, 4, 1, 2]
    c, s_ = np.cos(0.3), np.sin(0.3)  # an oblique series, rotated about the z axis
    folder = make_dicom_series(tmp_path / "s", n_slices=n, order=files, orientation=(c, s_, 0, -s_, c, 0),
                               origin=(-12.5, 40.0, -70.0), spacing=(0.9, 0.7))
    vol = read_dicom_series(folder)
    assert vol.array[0, 0].tolist() == [100.0 * k for k in range(n)]  # slices in spatial order
    ras_from_lps = np.diag([-1.0, -1.0, 1.0])
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(path))
        k = round(ds.pixel_array[0, 0] * 2.0 - 1024.0) // 100  # the slice this file holds
        for r, col in [(0, 0), (15, 0), (0, 11), (7, 5)]:
            voxel = vol.affine @ np.array([col, r, k, 1.0])
            assert np.allclose(voxel[:3], ras_from_lps @ _lps_of_file_pixel(ds, r, col), atol=1e-6), (path.name, r, col)
    # the origin is the first slice in space, not the first file by name
    assert np.allclose(vol.affine[:3, 3], ras_from_lps @ np.array([-12.5, 40.0, -70.0]))


def test_dicom_errors(tmp_path):
    folder = make_dicom_series(tmp_path / "s", n_slices=3)
    bad = sorted(folder.iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match=f"{bad.name}: corrupt or unreadable DICOM"):
        read_dicom_series(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no DICOM files"):
        read_dicom_series(tmp_path / "empty")


def test_image_reader_and_fit(tmp_path):
    img = read_image(write_png(tmp_path / "x.png", size=20))
    assert img.shape == (1, 20, 20) and 0 <= img.min() and img.max() <= 1
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="broken.jpg: corrupt or unreadable image"):
        read_image(broken)
    assert fit_to_size(np.zeros((10, 20), np.float32), 8).shape == (8, 8)
    assert fit_to_size(np.zeros((4, 6, 5), np.float32), 8).shape == (8, 8, 8)


def test_augmentation_keeps_shape():
    aug = train_augmentation(2)
    aug.set_random_state(0)
    out = torch.as_tensor(aug(torch.rand(1, 16, 16)))
    assert out.shape == (1, 16, 16)


def test_dicom_slices_of_different_shapes(tmp_path):
    folder = make_dicom_series(tmp_path / "s", n_slices=2)
    make_dicom_series(tmp_path / "other", n_slices=1, rows=8, cols=8)
    (tmp_path / "other" / "000.dcm").rename(folder / "zzz.dcm")
    with pytest.raises(DataError, match="s: slices have different shapes"):
        read_dicom_series(folder)
