"""The sampling loop: noise to images with any sampler, with optional guidance."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch
from tqdm.auto import tqdm

from meddiff.sampling.base import Sampler
from meddiff.sampling.guidance import ClassifierGuidance, classifier_free_output


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    sampler: Sampler,
    *,
    shape: Sequence[int],
    num_inference_steps: int,
    y: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    classifier_guidance: Optional[ClassifierGuidance] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    progress: bool = True,
    cond: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run the reverse process from ``x_T ~ N(0, I)`` to ``x_0``.

    Deterministic given ``generator`` (its device may differ from ``device``).

    Args:
        model: the denoiser ``model(x_t, t[, y])``; switched to eval mode for the loop.
        sampler: a :class:`~meddiff.sampling.ddpm.DDPMSampler` or :class:`~meddiff.sampling.ddim.DDIMSampler`.
        shape: ``[N, C, *S]`` of the output.
        y: ``[N]`` class labels (for a conditional model and/or classifier guidance), or None.
        guidance_scale: classifier-free guidance scale (0 unconditional, 1 conditional).
        classifier_guidance: optional classifier-guidance hook.
        cond: ``[N, K, *S]`` spatial condition in {-1, +1} (a mask, for a model with
            ``cond_channels``), guided like the label; None for none.
    Returns:
        ``[N, C, *S]`` float32 samples on ``device``, in about [-1, 1].
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sampler.set_timesteps(num_inference_steps)
    gen_dev = generator.device if generator is not None else device
    x = torch.randn(tuple(shape), generator=generator, device=gen_dev).to(device)
    if y is not None:
        y = y.to(device)
    if cond is not None:
        cond = cond.to(device)
    null_label = getattr(model, "null_label", 0)
    # An unconditional model with classifier guidance: the labels go to the classifier only.
    model_y = y if getattr(model, "num_classes", 0) else None
    try:
        for t in tqdm(sampler.timesteps, desc="sampling", disable=not progress, leave=False):
            t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
            with autocast():
                out = classifier_free_output(model, x, t_batch, model_y, guidance_scale=guidance_scale, null_label=null_label,
                                             cond=cond)
            out = out.float()
            if classifier_guidance is not None:
                out = classifier_guidance(out, x, t_batch, y)
            x = sampler.step(out, int(t), x, generator=generator)
    finally:
        model.train(was_training)
    return x
