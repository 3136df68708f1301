"""Spatial conditioning of the denoising objective: a conditioning image concatenated to ``x_t``.

The condition (a segmentation mask, one channel per region, later a source modality) travels
*packed* with its image: a training example is ``x0 = cat([image, cond], dim=1)`` of shape
``[N, C_img + C_cond, *S]``, so every data path built for ``(x0, y)`` pairs (Poisson sampling,
the per-example gradient engines, the federated sites) carries it unchanged. Only the image is
noised; the network sees ``cat([x_t, cond])`` (Dorjsembe et al. 2024, Med-DDPM, Sec. III-B:
mask-conditioned synthesis by channel concatenation) and regresses the image's target.

Classifier-free guidance (Ho & Salimans 2022, Sec. 3.2) needs a model that also knows the
unconditional score: with probability ``cond_dropout`` an example's condition is replaced by the
null condition (all zeros; a real condition is in {-1, +1}). The drop is per example and drawn
from the same generator as ``(t, eps)``, after them, so per-example losses stay independent of
each other and per-example gradients under DP-SGD remain exact.

A lesion-focused loss (after the lesion-focused objective of Zhang et al. 2025, LeFusion,
arXiv 2403.14066, whose lesion-focused loss regresses only inside the lesion) weights each pixel's squared
error by ``w`` inside the example's own, dilated tumour mask and by 1 elsewhere:
``L = mean_pixels((1 + (w - 1) * M_dil) * (out - target)^2)``, so ``w = 1`` is ``L_simple``
exactly. The weight map of a row is read from that row's (possibly dropped) condition only: a
null condition has no tumour and weight 1 everywhere, and the loss stays per example.

Latent diffusion (Rombach et al. 2022, Sec. 3.3, "concatenation" conditioning) conditions the
latent denoiser on the mask *on the latent grid*: :func:`condition_on_grid` area-pools each
condition channel to the latent's side (``S/f``), so a latent cell's value is ``2 * a - 1`` with
``a`` the fraction of its ``f x f (x f)`` pixels inside the region. The lesion weight map reads
that fraction: a cell's weight is the mean of its pixels' weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from meddiff.diffusion.anatomy import AnatomyConstraint
from meddiff.diffusion.gaussian import Denoiser, GaussianDiffusion, _gen_device, collapse_noise_multiplicity, row_mse


def mask_to_condition(mask: torch.Tensor) -> torch.Tensor:
    """A binary mask ``[N, K, *S]`` (or ``[K, *S]``) in {0, 1} as a condition in {-1, +1}."""
    return mask.float().mul(2.0).sub(1.0)


def condition_on_grid(cond: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """A condition ``[N, K, *S]`` (in {-1, +1}; zeros = null) area-pooled to ``[N, K, *spatial]``.

    Area (average) pooling rather than nearest neighbour: a lesion smaller than a latent cell
    (a few-pixel necrotic core at ``f = 4``) stays visible as a partial value instead of vanishing
    or being kept whole depending on which pixel nearest neighbour hits; it is exact where a mask
    is constant over a cell, linear (so the null condition stays all zeros), and defined for 2-D
    and 3-D alike (``F.interpolate(mode="area")`` is adaptive average pooling).
    """
    if tuple(cond.shape[2:]) == tuple(spatial):
        return cond
    if len(spatial) != cond.ndim - 2:
        raise ValueError(f"a {cond.ndim - 2}-D condition {tuple(cond.shape)} cannot be pooled to the grid {tuple(spatial)}")
    return F.interpolate(cond.float(), size=tuple(spatial), mode="area")


def lesion_fraction(cond: torch.Tensor, lesion_channels: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """The fraction ``[R, 1, *S]`` of each pixel (or latent cell) that is tumour, from conditions
    ``[R, C_cond, *S]`` in [-1, +1]: the lesion channels' occupancies ``(c + 1) / 2`` summed and
    capped at 1 (the union of disjoint sub-regions; in pixel space, where the occupancies are 0 or
    1, exactly "any lesion channel set"). A null condition (a row of zeros) has no tumour.
    ``lesion_channels`` index ``cond``'s channels; None = all but the first (the brain) when there
    are several, else channel 0."""
    if lesion_channels is None:
        lesion_channels = tuple(range(1, cond.shape[1])) if cond.shape[1] > 1 else (0,)
    occupancy = (cond[:, list(lesion_channels)].float() + 1.0).mul(0.5).clamp(0.0, 1.0)
    real = (cond.flatten(1).abs().amax(1) > 0).float().reshape(-1, *[1] * (cond.ndim - 1))
    return occupancy.sum(dim=1, keepdim=True).clamp(max=1.0) * real


def lesion_weight_map(cond: torch.Tensor, *, weight: float, dilation: int = 0,
                      lesion_channels: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """Per-pixel (per-cell) loss weights ``[R, 1, *S]`` from conditions ``[R, C_cond, *S]``:
    ``1 + (weight - 1) * M``, with ``M`` the :func:`lesion_fraction` (binary in pixel space)
    dilated by ``dilation`` pixels or cells per side (max-pooling, a (2d+1)-wide square or cube).
    Each row's map depends on that row alone.
    """
    lesion = lesion_fraction(cond, lesion_channels)
    if dilation > 0:
        pool = F.max_pool2d if lesion.ndim == 4 else F.max_pool3d
        lesion = pool(lesion, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    return 1.0 + (float(weight) - 1.0) * lesion


class SpatialConditioning:
    """The denoising loss of :class:`GaussianDiffusion` with a concatenated conditioning image.

    Args:
        diffusion: the forward process and parameterisation.
        image_channels: ``C_img``, the leading channels of a packed example; the rest is the condition.
        cond_dropout: probability that an example trains with the null condition.
        lesion_weight: ``w``, the weight of squared errors inside the (dilated) tumour mask; 1 = ``L_simple``.
        lesion_dilation: pixels (voxels) by which the tumour mask grows before weighting.
        lesion_channels: condition channels whose union is the tumour (see :func:`lesion_weight_map`).
        anatomy: a frozen segmenter's Dice on the predicted ``x0`` against the condition, added to
            each row's loss (:class:`~meddiff.diffusion.anatomy.AnatomyConstraint`); None = off.
    """

    def __init__(self, diffusion: GaussianDiffusion, *, image_channels: int, cond_dropout: float = 0.0,
                 lesion_weight: float = 1.0, lesion_dilation: int = 0,
                 lesion_channels: Optional[tuple[int, ...]] = None, anatomy: Optional[AnatomyConstraint] = None):
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        if image_channels < 1:
            raise ValueError(f"image_channels must be >= 1, got {image_channels}")
        if not lesion_weight > 0.0 or lesion_dilation < 0:
            raise ValueError(f"lesion_weight must be > 0 and lesion_dilation >= 0, got {lesion_weight} and {lesion_dilation}")
        self.diffusion, self.image_channels, self.cond_dropout = diffusion, image_channels, cond_dropout
        self.lesion_weight, self.lesion_dilation = float(lesion_weight), int(lesion_dilation)
        self.lesion_channels, self.anatomy = lesion_channels, anatomy

    def split(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x0 [N, C_img + C_cond, *S] -> (image [N, C_img, *S], cond [N, C_cond, *S])``."""
        if x0.shape[1] <= self.image_channels:
            raise ValueError(f"a packed example needs more than {self.image_channels} channel(s) (image + condition), "
                             f"got {x0.shape[1]}")
        return x0[:, :self.image_channels], x0[:, self.image_channels:]

    def training_inputs(self, x0: torch.Tensor, *, y: Optional[torch.Tensor] = None, noise_multiplicity: int = 1,
                        generator: Optional[torch.Generator] = None):
        """:meth:`GaussianDiffusion.training_inputs` on the image, with the (possibly dropped)
        condition concatenated to ``x_t``.

        Returns ``(cat([x_t, cond]) [N*K, C_img + C_cond, *S], t [N*K], y_rows [N*K] | None,
        target [N*K, C_img, *S])``, rows grouped by example.
        """
        image, cond = self.split(x0)
        k = int(noise_multiplicity)
        x_t, t, y_rows, target = self.diffusion.training_inputs(image, y=y, noise_multiplicity=k, generator=generator)
        if self.cond_dropout >= 1.0:
            cond = torch.zeros_like(cond)
        elif self.cond_dropout > 0.0:
            drop = torch.rand(cond.shape[0], generator=generator, device=_gen_device(generator, x0)).to(x0.device)
            keep = (drop >= self.cond_dropout).to(cond.dtype).reshape(-1, *[1] * (cond.ndim - 1))
            cond = cond * keep
        cond_rows = cond.repeat_interleave(k, dim=0) if k > 1 else cond
        return torch.cat([x_t, cond_rows.to(x_t.dtype)], dim=1), t, y_rows, target

    def training_losses(self, model: Denoiser, x0: torch.Tensor, *, y: Optional[torch.Tensor] = None,
                        noise_multiplicity: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-example ``L_simple`` (Ho et al. 2020, eq. 14) of the conditioned denoiser, lesion-weighted
        when ``lesion_weight != 1``, averaged over K draws. ``x0``: ``[N, C_img + C_cond, *S]``
        packed; returns ``[N]`` float32."""
        x_in, t, y_rows, target = self.training_inputs(x0, y=y, noise_multiplicity=noise_multiplicity, generator=generator)
        out = model(x_in, t, y_rows) if y_rows is not None else model(x_in, t)
        return collapse_noise_multiplicity(self.row_losses(out, x_in, t, target), noise_multiplicity)

    def row_losses(self, out: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each row's (lesion-weighted) MSE, plus the anatomy term (:class:`AnatomyConstraint`) when
        there is one. ``out``, ``target``: ``[R, C_img, *S]``; ``x_in [R, C_img + C_cond, *S]``; ``[R]``."""
        rows = row_mse(out, target, self.loss_weights(x_in))
        if self.anatomy is None:
            return rows
        x_t, cond = x_in[:, :self.image_channels], x_in[:, self.image_channels:]
        x0_hat, _ = self.diffusion.split_model_output(out, x_t, t)
        return rows + self.anatomy.row_losses(x0_hat, cond, t)

    def loss_weights(self, x_in: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-pixel weights ``[R, 1, *S]`` of the regression from the rows' own (possibly dropped)
        conditions in ``x_in [R, C_img + C_cond, *S]``; None (unweighted) when ``lesion_weight`` is 1."""
        if self.lesion_weight == 1.0:
            return None
        return lesion_weight_map(x_in[:, self.image_channels:].detach(), weight=self.lesion_weight,
                                 dilation=self.lesion_dilation, lesion_channels=self.lesion_channels)
