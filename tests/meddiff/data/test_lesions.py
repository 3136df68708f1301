"""Rule-placed tumour masks: inside the brain, of the asked size, nested sub-regions, seeded, 2-D and 3-D."""

import numpy as np
import pytest
from scipy import ndimage

from meddiff.data.lesions import ellipse_brain, rule_masks


def _regions(masks):
    return (masks[:, c].astype(bool) for c in range(4))  # brain, necrotic, oedema, enhancing


def test_tumours_lie_inside_the_brain_with_nested_sub_regions():
    masks = rule_masks(8, size=32, radius=(3.0, 5.0), seed=1)
    assert masks.shape == (8, 4, 32, 32) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    brain, necrotic, oedema, enhancing = _regions(masks)
    tumour = necrotic | oedema | enhancing
    assert not (tumour & ~brain).any() and all(t.any() for t in enhancing)
    assert not (necrotic & enhancing).any() and not (necrotic & oedema).any() and not (oedema & enhancing).any()
    for i in range(8):
        core = necrotic[i] | enhancing[i]
        assert ndimage.label(core)[1] == 1  # one tumour core: a necrotic centre inside an enhancing rim
        assert not (ndimage.binary_dilation(necrotic[i]) & oedema[i]).any()  # the rim separates core and halo
        assert (ndimage.binary_dilation(core) & oedema[i]).any()  # the halo hugs the core


def test_tumour_core_radius_stays_in_range():
    for lo, hi in ((2.0, 3.0), (5.0, 6.0)):
        _, necrotic, _, enhancing = _regions(rule_masks(10, size=48, radius=(lo, hi), seed=3))
        for core in necrotic | enhancing:
            points = np.argwhere(core)
            extent = (points.max(0) - points.min(0) + 1) / 2  # half the bounding box per axis
            assert lo - 1 <= extent.min() and extent.max() <= hi + 0.5


def test_same_seed_same_masks_other_seed_other_masks():
    a, b = rule_masks(3, size=24, seed=7), rule_masks(3, size=24, seed=7)
    assert np.array_equal(a, b) and not np.array_equal(a, rule_masks(3, size=24, seed=8))


def test_3d_masks_and_given_brains():
    masks = rule_masks(2, size=16, spatial_dims=3, radius=(2.0, 3.0), seed=0)
    assert masks.shape == (2, 4, 16, 16, 16)
    brain, necrotic, oedema, enhancing = _regions(masks)
    assert not ((necrotic | oedema | enhancing) & ~brain).any() and enhancing.any(axis=(1, 2, 3)).all()
    given = np.zeros((1, 24, 24), np.uint8)
    given[0, 2:14, 4:20] = 1  # a box in one corner: tumours stay in it
    masks = rule_masks(4, size=24, radius=(1.5, 2.5), brains=given, seed=0)
    assert (masks[:, 0] == given[0]).all() and not (masks[:, 1:].any(1) & ~given.astype(bool)).any()


def test_impossible_requests_are_refused():
    rng = np.random.default_rng(0)
    assert ellipse_brain(16, 2, rng).shape == (16, 16)
    with pytest.raises(ValueError, match="does not fit in a brain"):
        rule_masks(1, size=16, radius=(9.0, 9.0), seed=0)
    with pytest.raises(ValueError, match="0 < MIN <= MAX"):
        rule_masks(1, size=16, radius=(3.0, 2.0))
    with pytest.raises(ValueError, match="do not fit"):
        rule_masks(1, size=16, brains=np.ones((1, 8, 8), np.uint8))
