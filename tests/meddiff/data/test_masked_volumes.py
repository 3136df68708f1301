"""BraTS-layout volumes with segmentations as (image, label, mask): the masks stay on their images'
grid through reorientation, resampling, the foreground crop, slicing, padding and resizing."""

import nibabel as nib
import numpy as np
import pytest

from configs import load_config
from meddiff.data.adapters import index_dataset
from meddiff.data.masked import MaskedVolumeDataset, load_record_with_masks
from meddiff.recipes.build import build_masked_dataset
from tests.conftest import TINY_OVERRIDES, shared_file


def _case(root, i, affine):
    """A head (300) with an enhancing block (900, seg 3) and an oedema block (600, seg 2)."""
    shape = (24, 28, 20)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    img = np.where((grid**2).sum(0) < 0.8, 300.0, 0.0)
    seg = np.zeros(shape, np.uint8)
    enh = (np.abs(grid[0] - 0.3) < 0.2) & (np.abs(grid[1] + 0.2) < 0.2) & (np.abs(grid[2] - 0.1) < 0.3)
    oed = (np.abs(grid[0] + 0.35) < 0.15) & (np.abs(grid[1] - 0.25) < 0.15) & (np.abs(grid[2]) < 0.3)
    img[enh], seg[enh], img[oed], seg[oed] = 900.0, 3, 600.0, 2
    case = root / f"BraTS-GLI-{i:05d}-000"
    case.mkdir(parents=True)
    for name, arr in ((f"{case.name}-t1c.nii.gz", img.astype(np.float32)), (f"{case.name}-seg.nii.gz", seg)):
        nib.save(nib.Nifti1Image(arr, affine), str(case / name))


def _cfg(root, *extra):
    return load_config(None, [*TINY_OVERRIDES, "data.dataset=brats", f"data.path={root}", "model.cond_channels=4",
                              "data.min_foreground=0.05", *extra])


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _check_aligned(images, masks):
    """Each region's mask lies on the intensity that marks it (normalised: background -1, head
    -0.33, oedema 0.33, enhancing 1). Pixels wholly inside the enhancing block are all in its mask;
    most mask pixels lie on their region's intensity (the rest on edges that resampling blends;
    a shift or a flip by one pixel fails, see the test below)."""
    x = images[:, 0]
    brain, _, oedema, enhancing = (masks[:, c].astype(bool) for c in range(4))
    assert enhancing.sum() > 10 and oedema.sum() > 10
    assert enhancing[x > 0.95].all() and (x[enhancing] > 0.0).mean() > 0.6
    assert ((x[oedema] > 0.1) & (x[oedema] < 0.5)).mean() > 0.6
    assert brain[x > -0.3].all() and (x[brain] > -0.97).mean() > 0.95


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_masks_follow_their_images_through_reorientation_resampling_and_resizing(tmp_path, spatial_dims):
    affine = np.array([[-1.5, 0, 0, 10], [0, 1.0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])  # L-flipped, anisotropic
    _case(tmp_path, 0, affine)
    extra = ["data.target_spacing=[1.5,1.5,1.5]"] + (["model.spatial_dims=3", "data.image_size=16"] if spatial_dims == 3 else [])
    cfg = _cfg(tmp_path, *extra)
    images, labels, masks = load_record_with_masks(index_dataset(cfg.data).records[0], cfg.data, spatial_dims=spatial_dims)
    assert images.shape[0] == labels.shape[0] == masks.shape[0] and masks.shape[1:] == (4,) + images.shape[2:]
    assert set(np.unique(masks)) <= {0, 1}
    assert np.array_equal(labels, masks[:, 1:].reshape(len(masks), -1).any(1).astype(np.int64))
    assert labels.sum() >= 1
    _check_aligned(images, masks)
    if spatial_dims == 3:
        return  # a 16^3 volume leaves the blocks too few voxels for the shift check below
    for moved in (np.roll(masks, 1, axis=-1), np.roll(masks, -1, axis=-2), np.flip(masks, axis=-1)):
        with pytest.raises(AssertionError):  # the check sees a one-pixel misalignment
            _check_aligned(images, moved)


def test_a_brats_folder_trains_mask_conditioned_models_and_augmentation_moves_both(tmp_path):
    for i in range(2):
        _case(tmp_path, i, np.diag([1.0, 1.0, 1.0, 1.0]))
    packed = build_masked_dataset(_cfg(tmp_path))
    x0, y = packed[0]
    assert x0.shape == (5, 16, 16) and len(packed) > 10
    aug = MaskedVolumeDataset(index_dataset(_cfg(tmp_path).data).records, _cfg(tmp_path, "data.augment=true").data,
                              train=True)
    aug.augment.set_random_state(0)
    items = [aug[i] for i in range(len(aug))]
    images, masks = np.stack([x.numpy() for x, _, _ in items]), np.stack([m.numpy() for _, _, m in items])
    assert not np.array_equal(masks, aug.masks.numpy())  # augmentation did move something
    _check_aligned(images, masks)


@pytest.mark.slow  # writes a pseudo-patient from the MNI152 template
def test_a_template_cohort_gives_its_tumour_masks_on_real_anatomy(tmp_path):
    from meddiff.data.template import write_template_cohort

    write_template_cohort(shared_file("mni152_t1_1mm.nii.gz"), tmp_path / "cohort", num_patients=1, spacing=4.0,
                          lesion_fraction=1.0)
    cfg = load_config(None, [*TINY_OVERRIDES, "data.dataset=brats", f"data.path={tmp_path / 'cohort'}",
                             "model.cond_channels=4", "data.image_size=32", "model.attention_resolutions=[16]"])
    images, labels, masks = load_record_with_masks(index_dataset(cfg.data).records[0], cfg.data)
    tumour = masks[:, 1:].any(1)
    assert labels.sum() >= 1 and np.array_equal(labels.astype(bool), tumour.any((1, 2)))
    brain = masks[:, 0].astype(bool)
    assert (tumour & ~brain).sum() <= 0.05 * tumour.sum()  # the lesion lies in the head
    x = images[:, 0]
    enhancing, healthy = masks[:, 3].astype(bool), brain & ~tumour
    assert x[enhancing].mean() > x[healthy].mean()  # the template's enhancing rim is brighter on t1c
