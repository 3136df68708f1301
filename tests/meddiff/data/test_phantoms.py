import numpy as np
import pytest
import torch

from meddiff.data import Acquisition, PhantomDataset, make_phantoms
from meddiff.data.phantoms import apply_acquisition, phantom_slice


def test_deterministic_per_seed_and_index():
    a, la = make_phantoms(6, 32, seed=3)
    b, lb = make_phantoms(6, 32, seed=3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    c, _ = make_phantoms(6, 32, seed=4)
    assert not np.array_equal(a, c)
    tail, ltail = make_phantoms(2, 32, seed=3, start=4)  # any slice of the stream on its own
    assert np.array_equal(tail, a[4:]) and np.array_equal(ltail, la[4:])


def test_range_shape_and_labels():
    images, labels = make_phantoms(40, 48, seed=0, lesion_fraction=0.5)
    assert images.shape == (40, 48, 48) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert set(labels.tolist()) == {0, 1}
    assert 8 <= labels.sum() <= 32
    none, l0 = make_phantoms(5, 32, lesion_fraction=0.0)
    assert l0.sum() == 0


def test_anatomy_head_outline_and_ventricles():
    rng = np.random.default_rng(0)
    img = phantom_slice(64, rng, lesion=False)
    assert img[0, 0] == 0 and img[-1, -1] == 0  # background outside the head
    centre = img[24:40, 24:40]
    assert centre.min() < 0.25  # dark CSF in the ventricles
    assert (img > 0.75).mean() > 0.1  # plenty of white matter


def test_lesion_is_visible():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    healthy = phantom_slice(64, rng_a, lesion=False)
    sick = phantom_slice(64, rng_b, lesion=True)
    assert np.abs(sick - healthy).max() > 0.3


def test_acquisition_effects_change_the_image_deterministically():
    clean = phantom_slice(32, np.random.default_rng(1), lesion=False)
    acq = Acquisition(bias_field=0.3, noise_level=0.05, contrast_gamma=0.8, blur_sigma=0.7, resolution=0.5, bias_seed=2)
    a = apply_acquisition(clean, acq, np.random.default_rng(0))
    b = apply_acquisition(clean, acq, np.random.default_rng(0))
    assert np.array_equal(a, b) and not np.allclose(a, clean, atol=0.02)
    assert np.array_equal(apply_acquisition(clean, Acquisition(), np.random.default_rng(0)), clean)
    with pytest.raises(ValueError, match="noise_level"):
        Acquisition(noise_level=-1)


def test_dataset_yields_tuples_in_minus_one_one():
    ds = PhantomDataset(8, 16, seed=0)
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1 <= ds.images.min() and ds.images.max() <= 1 and len(ds) == 8
