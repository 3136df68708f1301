"""Masks that travel with their images: phantom sub-regions, and alignment through resampling,
crops, resizing, flips and affine augmentation."""

import numpy as np
import pytest
import torch

from meddiff.data import PhantomDataset, make_phantoms
from meddiff.data.phantoms import MASK_CHANNELS
from meddiff.data.transforms import (crop_foreground_pair, fit_mask_to_size, fit_to_size, paired_train_augmentation,
                                     resample_pair)


def test_asking_for_masks_changes_no_image_or_label():
    plain, labels = make_phantoms(6, 32, seed=2)
    images, labels_m, masks = make_phantoms(6, 32, seed=2, masks=True)
    assert np.array_equal(plain, images) and np.array_equal(labels, labels_m)
    assert masks.shape == (6, len(MASK_CHANNELS), 32, 32) and masks.dtype == np.uint8


def test_phantom_masks_mark_the_tumour_sub_regions_inside_the_brain():
    images, labels, masks = make_phantoms(12, 64, seed=0, lesion_fraction=0.5, masks=True)
    brain, necrotic, oedema, enhancing = (masks[:, MASK_CHANNELS.index(c)].astype(bool) for c in MASK_CHANNELS)
    tumour = necrotic | oedema | enhancing
    assert np.array_equal(tumour.any(axis=(1, 2)), labels.astype(bool))  # a mask exactly where the label says
    assert not (necrotic & enhancing).any() and not (necrotic & oedema).any() and not (oedema & enhancing).any()
    assert (tumour & ~brain).sum() <= 0.02 * tumour.sum()  # inside the brain (up to boundary pixels)
    sick = labels == 1
    # the regions sit on what the image shows: a bright enhancing rim, a dark necrotic core
    assert images[sick][enhancing[sick]].mean() > 0.75
    assert images[sick][necrotic[sick]].mean() < 0.4
    assert images[sick][brain[sick] & ~tumour[sick]].mean() > 0.5
    assert brain.mean(axis=(1, 2)).min() > 0.3


def test_phantom_dataset_returns_triples_only_when_asked():
    assert len(PhantomDataset(4, 16)[0]) == 2
    ds = PhantomDataset(4, 16, with_masks=True)
    x, y, m = ds[0]
    assert x.shape == (1, 16, 16) and m.shape == (len(MASK_CHANNELS), 16, 16) and ds.mask_channels == MASK_CHANNELS


def _disk_pair(shape, centre, radius):
    """An image (-1 background, +1 inside a disk/ball) and the disk's mask ``[1, *shape]``."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    inside = ((grid - np.asarray(centre).reshape(-1, *[1] * len(shape))) ** 2).sum(0) <= radius**2
    return np.where(inside, 1.0, -1.0).astype(np.float32), inside[None].astype(np.uint8)


def _agreement(image, mask):
    """Fraction of pixels where the mask and the thresholded image agree."""
    return float(((np.asarray(image) > 0) == (np.asarray(mask)[0] > 0)).mean())


def test_mask_follows_its_image_through_crop_and_resize():
    image, mask = _disk_pair((40, 60), (12, 40), 6)
    image[30:, :8] = 0.5  # other foreground, so the crop box is not the disk alone
    cropped, cmask = crop_foreground_pair(image, mask)
    assert cropped.shape == cmask.shape[1:] and cropped.shape != image.shape
    small, smask = fit_to_size(cropped, 16), fit_mask_to_size(cmask, 16)
    assert set(np.unique(smask)) <= {0, 1}  # nearest neighbour: no blended labels
    core, background = small > 0.9, small < -0.9  # pixels wholly inside the disk / wholly outside anything
    assert core.sum() >= 3 and smask[0][core].all() and not smask[0][background].any()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mask_follows_its_image_through_flips_and_affine_augmentation(spatial_dims):
    shape = (24,) * spatial_dims
    image, mask = _disk_pair(shape, (6,) + (15,) * (spatial_dims - 1), 5)
    aug = paired_train_augmentation(spatial_dims)
    moved = 0
    for seed in range(8):
        aug.set_random_state(seed)
        out = aug({"image": torch.from_numpy(image)[None], "mask": torch.from_numpy(mask)})
        img, m = np.asarray(out["image"])[0], np.asarray(out["mask"])
        assert set(np.unique(m)) <= {0, 1}
        assert _agreement(img, m) > 0.98
        moved += not np.array_equal(m, mask)
    assert moved >= 4  # the augmentation really flipped/rotated most draws


def test_mask_follows_its_image_through_reorientation_and_resampling():
    image, mask = _disk_pair((20, 30, 12), (6, 20, 5), 4)
    affine = np.diag([-1.5, -1.0, 3.0, 1.0])  # LPS-like axes, anisotropic voxels
    img, m, aff = resample_pair(torch.from_numpy(image)[None], torch.from_numpy(mask), affine, (1.0, 1.0, 1.0))
    assert img.shape[1:] == m.shape[1:] and img.shape[1] == 30 and img.shape[3] > 30
    assert np.allclose(np.abs(np.diag(aff)[:3]), 1.0) and aff[0, 0] > 0  # RAS, 1 mm
    assert set(torch.unique(m).tolist()) <= {0, 1}
    assert _agreement(img[0], m) > 0.97
    # a known structure: the world position of the ball's centre is inside the resampled mask
    world = affine @ np.array([6, 20, 5, 1.0])
    voxel = np.round(np.linalg.inv(aff) @ world).astype(int)[:3]
    assert m[0][tuple(voxel)] == 1
