"""Mask outlines drawn over images: the boundary of a mask, in 2-D and 3-D, in red on grey."""

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.outputs import outline, save_overlay_png


def test_outline_is_the_mask_minus_its_erosion_in_2d_and_3d():
    square = torch.zeros(1, 1, 8, 8)
    square[..., 2:6, 2:6] = 1
    edge = outline(square)
    assert edge[0, 0, 2:6, 2:6].sum() == 12 and edge[0, 0, 3:5, 3:5].sum() == 0 and edge.sum() == 12
    cube = torch.zeros(1, 1, 6, 6, 6)
    cube[..., 1:5, 1:5, 1:5] = 1
    assert outline(cube).sum() == 4 ** 3 - 2 ** 3  # every voxel but the 2x2x2 interior


def test_overlay_draws_red_only_on_the_outline(tmp_path):
    images = torch.full((2, 1, 8, 8), 0.0)
    regions = torch.zeros(2, 1, 8, 8)
    regions[0, :, 2:6, 2:6] = 1
    rgb = np.asarray(Image.open(save_overlay_png(images, regions, tmp_path / "o.png", nrow=2, pad=0)))
    red = (rgb[..., 0] == 255) & (rgb[..., 1] == 0)
    assert rgb.shape == (8, 16, 3) and red.sum() == 12 and red[:, 8:].sum() == 0  # the empty mask draws nothing
    assert (rgb[~red] == 128).all()  # grey elsewhere: 0.0 in [-1, 1]
    volumes = save_overlay_png(torch.zeros(1, 1, 6, 6, 6), torch.ones(1, 1, 6, 6, 6), tmp_path / "v.png", pad=0)
    assert np.asarray(Image.open(volumes)).shape == (6, 6, 3)  # the middle slice
    with pytest.raises(ValueError, match="not \\[N, 1, \\*S\\] pairs"):
        save_overlay_png(images, regions[:1], tmp_path / "x.png")
