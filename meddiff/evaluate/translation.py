"""Image-to-image translation metrics (e.g. T1 -> T2, MRI -> CT): SSIM, PSNR, MS-SSIM and MAE over
the whole image and inside a body mask.

Images are ``[N, C, H, W]`` or ``[N, C, D, H, W]`` in the target's units (MR intensities, CT in
HU), compared with an explicit ``data_range`` (the span of the units the images live in: 1 for MR in
[0, 1], e.g. 2000 for CT clipped to [-1000, 1000] HU). Whole-image SSIM (Wang et al. 2004), PSNR,
MAE and MS-SSIM (Wang et al. 2003) are MONAI's metrics. MONAI has no masked forms, so the masked
ones are written here: masked MAE and MSE average only the mask's voxels, and masked SSIM
averages MONAI's SSIM map (:func:`monai.metrics.regression.compute_ssim_and_cs`) over the mask's
voxels where a full window fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

#: MONAI's default MS-SSIM scale weights (Wang et al. 2003): five scales.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass(frozen=True)
class TranslationScores:
    """Per-image scores ``{name: [N] float64 tensor}`` and the metrics not computed ``{name: reason}``.

    Names: ``ssim``, ``psnr`` (dB; ``inf`` for identical images, no cap), ``mae`` (target units),
    ``ms_ssim``, and with a mask ``ssim_masked``, ``psnr_masked``, ``mae_masked``.
    """

    values: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """The mean of each computed metric over the images."""
        return {k: float(v.mean()) for k, v in self.values.items()}


def _check(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> int:
    if pred.shape != target.shape or pred.dim() not in (4, 5):
        raise ValueError(f"pred and target must both be [N, C, H, W] or [N, C, D, H, W]; got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0 (the span of the images' units), got {data_range}")
    return pred.dim() - 2


def _window(spatial: tuple[int, ...], win_size: int) -> int:
    if win_size % 2 == 0 or win_size < 3:
        raise ValueError(f"SSIM win_size must be odd and >= 3, got {win_size}")
    if min(spatial) < win_size:
        raise ValueError(f"images {spatial} are smaller than the SSIM window {win_size}; pass a smaller win_size")
    return win_size


def ms_ssim_min_side(kernel_size: int = 11, scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """The smallest side MONAI's MS-SSIM accepts: ``side // (scales - 1)^2 > kernel_size - 1``
    (``monai.metrics.regression.compute_ms_ssim``); 176 for the defaults."""
    div = max(1, scales - 1) ** 2
    return div * kernel_size


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image mean ``[N]`` of ``values [N, C, *S]`` over ``mask``'s (broadcastable) nonzero
    voxels; NaN for an image whose mask is empty."""
    m = torch.broadcast_to(mask.bool(), values.shape).flatten(1).to(values.dtype)
    v = values.flatten(1)
    count = m.sum(1)
    return torch.where(count > 0, (v * m).sum(1) / count.clamp(min=1), torch.full_like(count, float("nan")))


def masked_ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, data_range: float,
                win_size: int = 11) -> torch.Tensor:
    """Per-image mean ``[N]`` of the SSIM map (Wang et al. 2004, eq. 13; Gaussian window, sigma 1.5)
    over the mask. MONAI's map covers only positions where the window fits inside the image
    ("valid" convolution), so the mask is cropped by ``win_size // 2`` per side to match."""
    from monai.metrics.regression import compute_ssim_and_cs

    spatial = _check(pred, target, data_range)
    win = _window(tuple(pred.shape[2:]), win_size)
    ssim_map, _ = compute_ssim_and_cs(pred.float(), target.float(), spatial, kernel_size=(win,) * spatial,
                                      kernel_sigma=(1.5,) * spatial, data_range=data_range)
    h = win // 2
    crop = (slice(None), slice(None)) + tuple(slice(h, s - h) for s in pred.shape[2:])
    full_mask = torch.broadcast_to(mask.bool(), pred.shape)
    return masked_mean(ssim_map.double(), full_mask[crop])


def body_mask(target: torch.Tensor, *, threshold: float, fill_holes: bool = True) -> torch.Tensor:
    """The body (head) of each target image: voxels above ``threshold`` in the target's units (e.g.
    -500 HU for CT: air is -1000; a small fraction of the range for MR), with enclosed holes filled
    (dark CSF and sinuses inside the head belong to it; scipy ``binary_fill_holes``).

    Args:
        target: ``[N, C, *S]``.
    Returns:
        ``[N, 1, *S]`` bool: a voxel is body if any channel is above the threshold.
    """
    above = (target > threshold).any(dim=1, keepdim=True)
    if not fill_holes:
        return above
    filled = [ndimage.binary_fill_holes(a[0]) for a in above.cpu().numpy()]
    return torch.from_numpy(np.stack(filled)[:, None]).to(target.device)


def _ms_ssim(pred, target, spatial: int, data_range: float, values: dict, skipped: dict) -> None:
    from monai.metrics import MultiScaleSSIMMetric

    need = ms_ssim_min_side()
    if min(pred.shape[2:]) < need:
        skipped["ms_ssim"] = (f"images {tuple(pred.shape[2:])} are too small for MONAI's 5-scale MS-SSIM with an "
                              f"11-voxel window (every side must be >= {need})")
        return
    metric = MultiScaleSSIMMetric(spatial_dims=spatial, data_range=data_range)
    values["ms_ssim"] = metric(pred, target).reshape(-1).double()


def translation_metrics(pred: torch.Tensor, target: torch.Tensor, *, data_range: float,
                        mask: torch.Tensor | None = None, win_size: int = 11) -> TranslationScores:
    """SSIM, PSNR, MS-SSIM and MAE of translated images against their targets, and with ``mask``
    (``[N, 1 or C, *S]``, nonzero = inside, e.g. :func:`body_mask`) the masked SSIM, PSNR and MAE.

    Args:
        pred, target: ``[N, C, H, W]`` or ``[N, C, D, H, W]`` in the target's units.
        data_range: the span of those units (SSIM's constants, PSNR's peak).
        win_size: odd SSIM window side (Gaussian, sigma 1.5).
    Returns:
        :class:`TranslationScores`; PSNR = ``20 log10(data_range) - 10 log10(MSE)``.
    """
    from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric

    spatial = _check(pred, target, data_range)
    win = _window(tuple(pred.shape[2:]), win_size)
    pred, target = pred.float(), target.float()
    values: dict[str, torch.Tensor] = {
        "ssim": SSIMMetric(spatial_dims=spatial, data_range=data_range, win_size=win)(pred, target).reshape(-1),
        "psnr": PSNRMetric(max_val=data_range)(pred, target).reshape(-1),
        "mae": MAEMetric()(pred, target).reshape(-1),
    }
    values = {k: v.double() for k, v in values.items()}
    skipped: dict[str, str] = {}
    _ms_ssim(pred, target, spatial, data_range, values, skipped)
    if mask is not None:
        if mask.dim() != pred.dim() or mask.shape[0] != pred.shape[0] or mask.shape[2:] != pred.shape[2:]:
            raise ValueError(f"mask must be [N, 1 or C, *S] matching images {tuple(pred.shape)}, got {tuple(mask.shape)}")
        err = (pred - target).double()
        values["mae_masked"] = masked_mean(err.abs(), mask)
        mse = masked_mean(err**2, mask)
        values["psnr_masked"] = 20 * np.log10(data_range) - 10 * torch.log10(mse)
        values["ssim_masked"] = masked_ssim(pred, target, mask, data_range=data_range, win_size=win)
        skipped["ms_ssim_masked"] = "MS-SSIM downsamples the images, so it has no full-resolution map to mask"
    return TranslationScores(values, skipped)
