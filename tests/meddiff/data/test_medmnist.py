import numpy as np
import pytest

from meddiff.data import ArrayDataset, read_medmnist_npz
from tests.conftest import shared_file


def _write(path, **arrays):
    np.savez_compressed(path, **arrays)
    return path


def test_reads_2d_grey_rgb_and_3d(tmp_path):
    grey = _write(tmp_path / "g.npz", train_images=np.zeros((5, 28, 28), np.uint8), train_labels=np.arange(5).reshape(5, 1))
    x, y = read_medmnist_npz(grey)
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [0, 1, 2, 3, 4]
    rgb = _write(tmp_path / "r.npz", val_images=np.zeros((3, 28, 28, 3), np.uint8), val_labels=np.ones((3, 1)))
    assert read_medmnist_npz(rgb, "val")[0].shape == (3, 3, 28, 28)
    vol = _write(tmp_path / "v.npz", test_images=np.zeros((2, 28, 28, 28), np.uint8), test_labels=np.zeros((2, 1)))
    assert read_medmnist_npz(vol, "test", spatial_dims=3)[0].shape == (2, 1, 28, 28, 28)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        read_medmnist_npz(tmp_path / "nope.npz")
    f = _write(tmp_path / "k.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"k.npz: missing key\(s\) \['train_labels'\]"):
        read_medmnist_npz(f)
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="corrupt.npz: cannot read"):
        read_medmnist_npz(bad)
    m = _write(tmp_path / "m.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((3, 1)))
    with pytest.raises(ValueError, match="2 items but train_labels has 3"):
        read_medmnist_npz(m)
    with pytest.raises(ValueError, match="split"):
        read_medmnist_npz(m, "training")


def test_real_pneumoniamnist():
    path = shared_file("pneumoniamnist.npz")
    x, y = read_medmnist_npz(path, "train")
    assert x.shape == (4708, 1, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1214, 3494]
    ds = ArrayDataset(x[:64], y[:64], image_size=32, channels=1)
    img, label = ds[0]
    assert img.shape == (1, 32, 32) and -1.0 <= img.min() and img.max() <= 1.0
    assert img.std() > 0.1  # a real X-ray, not a blank


def test_garbage_and_nan_npz_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x80\x04not a zip archive at all")
    with pytest.raises(ValueError) as exc:
        read_medmnist_npz(garbage)
    assert "garbage.npz: cannot read as a MedMNIST .npz" in str(exc.value) and "allow_pickle" not in str(exc.value)
    images = np.zeros((3, 4, 4), np.float32)
    images[1, 2, 2] = np.nan
    f = _write(tmp_path / "nan.npz", train_images=images, train_labels=np.zeros((3, 1)))
    with pytest.raises(ValueError, match="nan.npz: 1 image.s. of train_images contain NaN or Inf"):
        read_medmnist_npz(f)
