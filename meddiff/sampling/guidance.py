"""Guidance: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from meddiff.diffusion.gaussian import GaussianDiffusion

Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_output(
    model: Callable[..., torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    y: Optional[torch.Tensor],
    *,
    guidance_scale: float,
    null_label: int,
    cond: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Guided network output ``out_uncond + s * (out_cond - out_uncond)`` (Ho & Salimans 2022, eq. 6).

    ``s = 0`` is the unconditional model, ``s = 1`` the conditional one; ``s > 1`` sharpens the
    condition. The conditional and unconditional passes share one batched forward. The condition
    is the label ``y``, the spatial condition ``cond`` (a mask concatenated to ``x_t``), or both;
    the unconditional pass drops all of it (null label, all-zero mask).

    Shapes: ``x_t [N, C, *S]``, ``t [N]``, ``y [N]`` or None, ``cond [N, K, *S]`` or None;
    returns ``[N, C, *S]``.
    """
    if cond is None:
        if y is None:
            return model(x_t, t)
        if guidance_scale == 1.0:
            return model(x_t, t, y)
    elif guidance_scale == 1.0:
        return model(x_t, t, y, cond=cond)
    null = torch.full_like(y, null_label) if y is not None else None
    if guidance_scale == 0.0:
        return model(x_t, t, null)  # no mask passed: the network's null condition
    both_y = torch.cat([y, null]) if y is not None else None
    if cond is None:
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both_y)
    else:
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both_y, cond=torch.cat([cond, torch.zeros_like(cond)]))
    cond_out, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond_out - uncond)


class ClassifierGuidance:
    """Shift the noise prediction along a classifier's gradient (Dhariwal & Nichol 2021, Alg. 2).

    ``eps_hat = eps - sqrt(1 - alpha_bar_t) * s * grad_x log p_phi(y | x_t)``, which conditions the
    score on ``y`` and serves both DDIM and DDPM (Song et al. 2021, score-based view).

    Args:
        classifier: a user model ``classifier(x_t [N, C, *S], t [N]) -> logits [N, num_classes]``
            trained on noisy images, e.g. a disease-probability classifier.
        scale: guidance scale ``s``.
        diffusion: the process, for the ``eps`` <-> model-output conversions.
    """

    def __init__(self, classifier: Classifier, *, scale: float, diffusion: GaussianDiffusion):
        self.classifier = classifier
        self.scale = float(scale)
        self.diffusion = diffusion

    def gradient(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``grad_x sum_i log p(y_i | x_t,i)``, shape ``[N, C, *S]``."""
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            log_probs = F.log_softmax(self.classifier(x, t).float(), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=x.device), y]
            return torch.autograd.grad(selected.sum(), x)[0]

    def __call__(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs class labels: pass y (e.g. --class-label)")
        _, eps = self.diffusion.split_model_output(model_output, x_t, t)
        sigma = self.diffusion._at(self.diffusion.sqrt_one_minus_alphas_cumprod, t, x_t)
        eps = eps - sigma * self.scale * self.gradient(x_t, t, y).to(eps.dtype)
        return self.diffusion.model_output_from_eps(eps, x_t, t)
