"""Paired phantoms: one anatomy in T1, T2 and CT, aligned pixel for pixel, with T1 unchanged."""

from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff.data.phantom_anatomy import CONTRASTS, MASK_CHANNELS, TISSUES
from meddiff.data.phantom_pairs import CTScan, PairedPhantomDataset, make_phantom_pairs
from meddiff.data.phantoms import make_phantoms, site_acquisition
from meddiff.data.transforms import hu_display, paired_train_augmentation

CSF, BONE, WM, GM = (TISSUES.index(t) for t in ("csf", "bone", "wm", "gm"))


def test_t1_phantoms_match_the_reference_drawn_before_the_label_map():
    # make_phantoms(8, 32, seed=0, masks=True) saved before the anatomy became a label map; a
    # tolerance, not bytes, so another CPU's last-bit rounding cannot fail it
    with np.load(Path(__file__).with_name("t1_phantoms_reference.npz")) as ref:
        images, labels, masks = make_phantoms(8, 32, seed=0, masks=True)
        np.testing.assert_allclose(images, ref["images"], rtol=0, atol=1e-5)
        assert np.array_equal(labels, ref["labels"]) and np.array_equal(masks, ref["masks"])


@pytest.mark.parametrize("target", ["t2", "ct"])
def test_a_t1_source_is_make_phantoms_image_and_the_target_shares_its_anatomy(target):
    acq = site_acquisition(1, 3)
    pairs = make_phantom_pairs(6, 32, seed=4, target=target, acquisition=acq, start=2)
    images, labels, masks = make_phantoms(6, 32, seed=4, acquisition=acq, start=2, masks=True)
    assert np.array_equal(pairs.source, images) and np.array_equal(pairs.labels, labels)
    assert np.array_equal(pairs.masks, masks)
    assert pairs.target.shape == pairs.source.shape and pairs.target.dtype == np.float32
    again = make_phantom_pairs(6, 32, seed=4, target=target, acquisition=acq, start=2)
    assert np.array_equal(again.target, pairs.target)  # deterministic, target noise included


def test_csf_is_dark_on_t1_bright_on_t2_and_near_water_on_ct_in_the_same_pixels():
    t2 = make_phantom_pairs(8, 64, seed=0, target="t2", lesion_fraction=0.0)
    ct = make_phantom_pairs(8, 64, seed=0, target="ct", lesion_fraction=0.0)
    assert np.array_equal(t2.tissues, ct.tissues) and np.array_equal(t2.source, ct.source)
    brain = t2.masks[:, MASK_CHANNELS.index("brain")].astype(bool)
    ventricles = (t2.tissues == CSF) & brain  # CSF inside the brain: the lateral ventricles
    wm, gm = t2.tissues == WM, t2.tissues == GM
    assert ventricles.sum() > 100
    assert t2.source[ventricles].mean() < 0.3 < 0.7 < t2.source[wm].mean()  # T1: dark CSF, bright white matter
    assert t2.target[ventricles].mean() > 0.75 > 0.4 > t2.target[wm].mean()  # T2: the reverse
    assert t2.target[gm].mean() > t2.target[wm].mean()  # T2: grey matter brighter than white
    assert 0.0 <= t2.target.min() and t2.target.max() <= 1.0
    assert 0 <= np.median(ct.target[ventricles]) <= 20  # CT: CSF near water
    assert 20 <= np.median(ct.target[wm]) < np.median(ct.target[gm]) <= 45
    assert 900 <= np.median(ct.target[ct.tissues == BONE]) <= 1100  # the skull ~ +1000 HU
    assert np.median(ct.target[ct.tissues == 0]) < -950  # air


def test_the_tumour_occupies_the_same_pixels_in_every_contrast():
    t2 = make_phantom_pairs(6, 64, seed=1, target="t2", lesion_fraction=1.0)
    ct = make_phantom_pairs(6, 64, seed=1, target="ct", lesion_fraction=1.0, ct_scan=CTScan(noise_hu=0.0))
    assert np.array_equal(t2.masks, ct.masks)
    oedema = t2.masks[:, MASK_CHANNELS.index("oedema")].astype(bool)
    necrotic = t2.masks[:, MASK_CHANNELS.index("necrotic")].astype(bool)
    healthy_wm = (t2.tissues == WM) & (t2.masks[:, 1:].sum(1) == 0)
    assert t2.target[oedema].mean() > t2.target[healthy_wm].mean() + 0.2  # oedema bright on T2
    assert t2.source[oedema].mean() < t2.source[healthy_wm].mean() - 0.1  # and dark on T1
    assert t2.target[necrotic].mean() > 0.7 and t2.source[necrotic].mean() < 0.4
    assert np.median(ct.target[oedema]) < np.median(ct.target[healthy_wm])  # hypodense oedema


def test_paired_dataset_scales_mr_to_minus_one_one_and_keeps_ct_in_hu_unless_windowed():
    ds = PairedPhantomDataset(4, 32, seed=0, target="ct", with_masks=True)
    src, tgt, label, mask = ds[0]
    assert src.shape == tgt.shape == (1, 32, 32) and mask.shape == (len(MASK_CHANNELS), 32, 32)
    assert -1 <= ds.source.min() and ds.source.max() <= 1 and ds.target.min() < -900 and ds.target.max() > 500
    windowed = PairedPhantomDataset(4, 32, seed=0, target="ct", ct_window=(40.0, 80.0))
    assert len(windowed[0]) == 3 and windowed.target.min() == -1 and windowed.target.max() == 1
    assert torch.equal(ds.source, windowed.source)
    shown = np.asarray(hu_display(ds.target.numpy()))
    assert shown.min() == 0.0 and shown.max() == 1.0  # display only: [0, 1] through the brain window
    with pytest.raises(ValueError, match="target contrast 'pet' is unknown"):
        make_phantom_pairs(1, 16, target="pet")
    with pytest.raises(ValueError, match="must differ"):
        make_phantom_pairs(1, 16, source="t2", target="t2")


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("target, floor", [("t2", 0.85), ("ct", 0.93)])
def test_pairs_stay_aligned_through_the_paired_augmentation(target, floor):
    pairs = make_phantom_pairs(1, 48, seed=2, target=target, lesion_fraction=0.0)
    lut = {c: np.array([CONTRASTS[c].tissue[t] for t in TISSUES]) for c in ("t1", target)}
    aug = paired_train_augmentation(2, image_keys=("image", "target"), mask_keys=("mask", "tissues"))
    moved = 0
    for seed in range(6):
        aug.set_random_state(seed)
        out = aug({"image": torch.from_numpy(pairs.source), "target": torch.from_numpy(pairs.target),
                   "mask": torch.from_numpy(pairs.masks[0]), "tissues": torch.from_numpy(pairs.tissues)})
        src, tgt = np.asarray(out["image"])[0], np.asarray(out["target"])[0]
        tissues, mask = np.asarray(out["tissues"])[0].astype(np.int64), np.asarray(out["mask"])
        assert set(np.unique(mask)) <= {0, 1} and set(np.unique(tissues)) <= set(range(len(TISSUES)))
        # one draw moved both images and the labels: each image still matches the moved label map
        # rendered in its contrast (a target moved by its own draw scores 0.62-0.87 here)
        assert _correlation(src, lut["t1"][tissues]) > 0.9
        assert _correlation(tgt, lut[target][tissues]) > floor
        ventricles = (tissues == CSF) & (mask[MASK_CHANNELS.index("brain")] == 1)
        assert np.median(src[ventricles]) < 0.35 and np.median(tgt[ventricles]) > (0.7 if target == "t2" else -5)
        moved += not np.array_equal(tissues, pairs.tissues[0])
    assert moved >= 3
