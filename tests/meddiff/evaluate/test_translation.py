"""Translation metrics against known values: identity, a constant offset, masks, MS-SSIM's size limit."""

import math

import pytest
import torch

from meddiff.data.phantom_pairs import make_phantom_pairs
from meddiff.evaluate.translation import body_mask, ms_ssim_min_side, translation_metrics


def _images(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(3, 1, 32, 32), (2, 2, 16, 16, 16)])
def test_identical_images_score_ssim_one_psnr_inf_mae_zero(shape):
    x = _images(shape)
    scores = translation_metrics(x, x.clone(), data_range=1.0, mask=torch.ones_like(x[:, :1]), win_size=7)
    v = scores.values
    assert torch.allclose(v["ssim"], torch.ones(shape[0], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(v["ssim_masked"], torch.ones(shape[0], dtype=torch.float64), atol=1e-5)
    assert torch.isinf(v["psnr"]).all() and torch.isinf(v["psnr_masked"]).all()  # no cap
    assert (v["mae"] == 0).all() and (v["mae_masked"] == 0).all()
    assert "too small" in scores.skipped["ms_ssim"] and "ms_ssim" not in v


def test_a_constant_offset_gives_that_mae_and_the_expected_psnr_in_hu():
    target = make_phantom_pairs(2, 32, seed=0, target="ct").target[:, None]
    target = torch.from_numpy(target).double()
    d, data_range = 25.0, 2000.0  # 25 HU off, CT clipped to a 2000 HU span
    scores = translation_metrics(target + d, target, data_range=data_range).values
    expected = 20 * math.log10(data_range) - 20 * math.log10(d)
    assert torch.allclose(scores["mae"], torch.full((2,), d, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(scores["psnr"], torch.full((2,), expected, dtype=torch.float64), atol=1e-3)
    assert (scores["ssim"] < 1).all()


def test_masked_mae_counts_only_the_mask():
    target = torch.zeros(2, 1, 20, 20)
    pred = target.clone()
    pred[:, :, :10] = 100.0  # wrong everywhere in the top half ...
    pred[:, :, 10:] += 3.0  # ... and 3 off in the bottom half
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[:, :, 10:] = True
    scores = translation_metrics(pred, target, data_range=1000.0, mask=mask, win_size=5)
    assert torch.allclose(scores.values["mae_masked"], torch.full((2,), 3.0, dtype=torch.float64))
    assert torch.allclose(scores.values["mae"], torch.full((2,), 51.5, dtype=torch.float64))
    assert torch.allclose(scores.values["psnr_masked"], torch.full((2,), 60 - 20 * math.log10(3), dtype=torch.float64))
    # SSIM inside the mask (away from its edge the error is a constant offset) beats the whole image's
    assert (scores.values["ssim_masked"] > scores.values["ssim"]).all()
    assert "ms_ssim_masked" in scores.skipped


def test_ms_ssim_is_computed_once_the_images_are_large_enough():
    side = ms_ssim_min_side()
    assert side == 176  # MONAI's 5 scales with an 11-voxel window: side // 16 > 10
    x = _images((1, 1, side, side))
    scores = translation_metrics(x, x.clone(), data_range=1.0)
    assert "ms_ssim" not in scores.skipped and abs(float(scores.values["ms_ssim"][0]) - 1.0) < 1e-5
    y = (x + 0.2 * _images((1, 1, side, side), seed=1)).clamp(0, 1)
    assert float(translation_metrics(y, x, data_range=1.0).values["ms_ssim"][0]) < 0.99


def test_body_mask_keeps_the_head_with_its_dark_inside_and_drops_the_air():
    pairs = make_phantom_pairs(2, 32, seed=3, target="ct")
    ct = torch.from_numpy(pairs.target)[:, None]
    body = body_mask(ct, threshold=-500.0)
    head = torch.from_numpy(pairs.tissues > 0)[:, None]
    assert body.shape == ct.shape and body.dtype == torch.bool
    assert (body == head).float().mean() > 0.97
    assert not body[..., 0, 0].any() and body[..., 16, 16].all()  # corner air out, the centre in


def test_bad_shapes_and_ranges_are_refused():
    x = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match="must both be"):
        translation_metrics(x, torch.zeros(1, 1, 16, 15), data_range=1.0)
    with pytest.raises(ValueError, match="data_range must be > 0"):
        translation_metrics(x, x, data_range=0.0)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        translation_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), data_range=1.0)
    with pytest.raises(ValueError, match="mask must be"):
        translation_metrics(x, x, data_range=1.0, mask=torch.ones(1, 1, 8, 8))
