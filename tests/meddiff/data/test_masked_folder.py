"""Folder CSVs with a ``mask`` column as (image, label, mask): PNG and NIfTI label maps, given
channels, alignment through padding and resizing, and errors that name the file and the row."""

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from configs import load_config
from meddiff.data.adapters import index_dataset
from meddiff.data.readers import DataError
from meddiff.data.transforms import fit_mask_to_size
from meddiff.recipes.build import build_masked_dataset
from tests.conftest import TINY_OVERRIDES


def _scene(shape):
    """A head (intensity 100) with an oedema block (170, label 2) and an enhancing block (250, label 3)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    img = np.where((grid**2).sum(0) < 0.8, 100.0, 0.0)
    labels = np.zeros(shape, np.uint8)
    enh = (np.abs(grid[0] - 0.3) < 0.3) & (np.abs(grid[1] + 0.25) < 0.3)
    oed = (np.abs(grid[0] + 0.35) < 0.25) & (np.abs(grid[1] - 0.3) < 0.25)
    img[enh], labels[enh], img[oed], labels[oed] = 250.0, 3, 170.0, 2
    return img, labels


def _cfg(root, table, *extra):
    return load_config(None, [*TINY_OVERRIDES, "data.dataset=folder", f"data.path={root}", f"data.labels_csv={table}",
                              "model.cond_channels=4", "data.min_foreground=0.05", *extra])


def _table(root, rows, header="path,label,mask"):
    table = root / "labels.csv"
    table.write_text(header + "\n" + "\n".join(rows) + "\n")
    return table


def _check_aligned(x, m):
    """Each region's mask lies on its intensity (after normalisation: background -1 < head <
    oedema < enhancing = the brightest); pixels wholly inside the enhancing block are in its mask,
    and most mask pixels lie on their region's level (edge pixels blend with their neighbours)."""
    brain, necrotic, oedema, enhancing = (m[:, c].astype(bool) for c in range(4))
    assert enhancing.sum() > 4 and oedema.sum() > 4 and not necrotic.any()
    head, oed, enh = (float(np.median(x[r])) for r in (brain & ~oedema & ~enhancing, oedema, enhancing))
    assert -1.0 < head < oed - 0.2 and oed < enh - 0.2 and enh > 0.9
    assert enhancing[x > 0.97].all() and (x[enhancing] > (oed + enh) / 2).mean() > 0.6
    assert (abs(x[oedema] - oed) < 0.1).mean() > 0.6 and brain[x > head - 0.05].all() and not brain[x < -0.99].any()


def test_png_images_with_png_label_maps_and_npy_channels(tmp_path):
    img, labels = _scene((24, 20))  # not square: padded, then resized alike
    Image.fromarray(img.astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(labels).save(tmp_path / "a_mask.png")
    channels = np.stack([img > 0, labels == 1, labels == 2, labels == 3]).astype(np.uint8)
    channels[0] = 1  # a given brain channel is used as given
    np.save(tmp_path / "b_mask.npy", channels)
    Image.fromarray(img.astype(np.uint8)).save(tmp_path / "b.png")
    data = build_masked_dataset(_cfg(tmp_path, _table(tmp_path, ["a.png,1,a_mask.png", "b.png,0,b_mask.npy"])))
    (x0a, ya), (x0b, yb) = data[0], data[1]
    assert x0a.shape == (5, 16, 16) and (int(ya), int(yb)) == (1, 0)  # the rows' labels
    x, m = x0a[:1].numpy(), ((x0a[1:] + 1) / 2).numpy()[None]
    _check_aligned(x, m)
    mb = ((x0b[1:] + 1) / 2).numpy()
    given_brain = fit_mask_to_size(np.ones((1, 24, 20), np.uint8), 16)[0]  # padded to a square like its image
    assert np.array_equal(mb[1:], m[0, 1:]) and np.array_equal(mb[0], given_brain)  # same regions, the given brain


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_nifti_volumes_with_nifti_label_maps(tmp_path, spatial_dims):
    img2, lab2 = _scene((24, 28))
    img, labels = np.repeat(img2[..., None], 12, axis=2), np.repeat(lab2[..., None], 12, axis=2)
    affine = np.diag([-1.5, 1.0, 2.0, 1.0])  # L-flipped, anisotropic: reoriented and resampled alike
    nib.save(nib.Nifti1Image(img.astype(np.float32), affine), str(tmp_path / "v.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "v_seg.nii.gz"))
    extra = ["model.spatial_dims=3", "data.image_size=16"] if spatial_dims == 3 else []
    data = build_masked_dataset(_cfg(tmp_path, _table(tmp_path, ["v.nii.gz,1,v_seg.nii.gz"]),
                                     "data.target_spacing=[1.5,1.5,1.5]", *extra))
    x0 = np.stack([data[i][0].numpy() for i in range(len(data))])
    assert x0.shape[1:] == (5,) + (16,) * spatial_dims and {int(data[i][1]) for i in range(len(data))} == {1}
    _check_aligned(x0[:, 0], (x0[:, 1:] + 1) / 2)


def test_missing_corrupt_or_unfit_masks_name_the_file_and_row(tmp_path):
    img, labels = _scene((16, 16))
    for name in ("a.png", "b.png"):
        Image.fromarray(img.astype(np.uint8)).save(tmp_path / name)
    Image.fromarray(labels).save(tmp_path / "a_mask.png")
    with pytest.raises(DataError, match=r"labels.csv:3: mask 'nope.png' not found"):
        index_dataset(_cfg(tmp_path, _table(tmp_path, ["a.png,1,a_mask.png", "b.png,1,nope.png"])).data)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small.png")
    for name, message in (("bad.png", "corrupt or unreadable mask"), ("rgb.png", "one channel"),
                          ("small.png", r"mask shape \(8, 8\) fits neither")):
        with pytest.raises(DataError, match=rf"labels.csv:3: .*{name}.*{message}"):
            build_masked_dataset(_cfg(tmp_path, _table(tmp_path, ["a.png,1,a_mask.png", f"b.png,0,{name}"])))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))
    with pytest.raises(DataError, match="labels.csv:2: mask 'a_mask.png' must be a NIfTI label map"):
        index_dataset(_cfg(tmp_path, _table(tmp_path, ["v.nii.gz,1,a_mask.png"])).data)
    (tmp_path / "v_seg.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"labels.csv:2: .*v_seg.nii.gz: corrupt or unreadable NIfTI"):
        build_masked_dataset(_cfg(tmp_path, _table(tmp_path, ["v.nii.gz,1,v_seg.nii.gz"])))
    with pytest.raises(DataError, match="a folder CSV needs a 'mask' column"):
        build_masked_dataset(_cfg(tmp_path, _table(tmp_path, ["a.png,1"], header="path,label")))
