"""An anatomy constraint on mask-conditioned denoising: a frozen segmenter must find the conditioning
mask in the denoiser's predicted clean image.

SynthDiff-style (an anatomy-constrained loss for synthesis): at low noise levels (``t <
max_t``), where the predicted ``x0`` is already an image, a segmenter trained on real data (its
weights a file, never downloaded) segments ``x0_hat`` and its soft Dice against the mask the
example was conditioned on (Milletari et al. 2016, "V-Net", eq. 1) is added to the denoising loss:

    L = L_simple + weight * 1[t < max_t and the mask was not dropped] * (1 - mean_k Dice_k)

Every term depends on its own row alone (the segmenter runs in eval mode, and its normalisation is
per image), so the loss stays per example and DP-SGD's per-example gradients stay exact. The
segmenter's parameters are frozen: the gradient flows through it into the denoiser only.
"""

from __future__ import annotations

import torch
from torch import nn


class AnatomyConstraint:
    """The anatomy term of each row of a mask-conditioned batch.

    Args:
        segmenter: frozen ``[R, 1, *S] -> [R, K, *S]`` logits, one per mask channel of the condition.
        weight: the term's weight against ``L_simple``.
        max_t: the term applies to rows with ``t < max_t``.
        smooth: added to the Dice numerator and denominator, so an empty region scores 1 when the
            segmenter predicts none of it.
    """

    def __init__(self, segmenter: nn.Module, *, weight: float, max_t: int, smooth: float = 1.0):
        if weight <= 0 or max_t < 1:
            raise ValueError(f"an anatomy constraint needs weight > 0 and max_t >= 1, got {weight} and {max_t}")
        self.segmenter = segmenter.eval()
        for p in self.segmenter.parameters():
            p.requires_grad_(False)
        self.weight, self.max_t, self.smooth = float(weight), int(max_t), float(smooth)

    def row_losses(self, x0_hat: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``weight * (1 - soft Dice)`` of each row, 0 where ``t >= max_t`` or the condition was dropped.

        Shapes: ``x0_hat [R, 1, *S]`` (the predicted clean image), ``cond [R, K, *S]`` (the mask in
        {-1, +1}, all zeros when dropped), ``t [R]``; returns ``[R]`` float32.
        """
        param = next(self.segmenter.parameters(), None)
        if param is not None and param.device != x0_hat.device:
            self.segmenter.to(x0_hat.device)
        probs = torch.sigmoid(self.segmenter(x0_hat.clamp(-1.0, 1.0)).float())
        if probs.shape != cond.shape:
            raise ValueError(f"the anatomy segmenter gives {tuple(probs.shape)} for conditions {tuple(cond.shape)}: "
                             "its output channels must be the model's model.cond_channels")
        target = (cond > 0).float()
        dims = tuple(range(2, probs.ndim))
        dice = (2 * (probs * target).sum(dims) + self.smooth) / (probs.sum(dims) + target.sum(dims) + self.smooth)
        active = (t < self.max_t) & (cond.flatten(1).abs().sum(1) > 0)
        return self.weight * active.float() * (1.0 - dice.mean(1))
