"""Direct image-to-image regression: the translation baseline without diffusion.

The same conditioned UNet as the diffusion model reads ``cat([0, source])`` at the fixed timestep
``t = 0`` and predicts the target image in one pass, trained with a per-pixel L1 loss (Isola et
al. 2017, Pix2Pix, eq. 3, without the adversarial term of eq. 4). Examples are packed as for the
spatially conditioned objective, ``x0 = cat([target, source])``, so loaders, Poisson sampling and
per-example gradients carry them unchanged; the loss of each row depends on that row alone.
"""

from __future__ import annotations

from typing import Optional

import torch

from meddiff.diffusion.gaussian import Denoiser, collapse_noise_multiplicity


class DirectRegression:
    """L1 regression of the target from the source (see the module docstring).

    Args:
        image_channels: ``C_t``, the leading (target) channels of a packed example; the rest is the source.
    """

    def __init__(self, *, image_channels: int):
        if image_channels < 1:
            raise ValueError(f"image_channels must be >= 1, got {image_channels}")
        self.image_channels = image_channels

    def split(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x0 [N, C_t + C_s, *S] -> (target [N, C_t, *S], source [N, C_s, *S])``."""
        if x0.shape[1] <= self.image_channels:
            raise ValueError(f"a packed example needs more than {self.image_channels} channel(s) (target + source), "
                             f"got {x0.shape[1]}")
        return x0[:, :self.image_channels], x0[:, self.image_channels:]

    def model_input(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cat([0, source]) [N, C_t + C_s, *S], t = 0 [N])``: what the UNet reads to translate ``source``."""
        zeros = source.new_zeros((source.shape[0], self.image_channels, *source.shape[2:]))
        return torch.cat([zeros, source], dim=1), torch.zeros(source.shape[0], dtype=torch.long, device=source.device)

    def predict(self, model: Denoiser, source: torch.Tensor) -> torch.Tensor:
        """The translation of ``source [N, C_s, *S]``: ``[N, C_t, *S]``."""
        x_in, t = self.model_input(source)
        return model(x_in, t)

    def training_inputs(self, x0: torch.Tensor, *, y: Optional[torch.Tensor] = None, noise_multiplicity: int = 1,
                        generator: Optional[torch.Generator] = None):
        """``(x_in [N*K, C_t + C_s, *S], t [N*K], None, target [N*K, C_t, *S])``, K copies of each row
        (the loss is deterministic; K only keeps the layout the gradient engines expect)."""
        target, source = self.split(x0)
        x_in, t = self.model_input(source)
        k = int(noise_multiplicity)
        if k > 1:
            x_in, t, target = (a.repeat_interleave(k, dim=0) for a in (x_in, t, target))
        return x_in, t, None, target

    def training_losses(self, model: Denoiser, x0: torch.Tensor, *, y: Optional[torch.Tensor] = None,
                        noise_multiplicity: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-example mean absolute error ``[N]`` float32 of the prediction from ``x0``'s source."""
        x_in, t, _, target = self.training_inputs(x0, noise_multiplicity=noise_multiplicity)
        return collapse_noise_multiplicity(self.row_losses(model(x_in, t), x_in, t, target), noise_multiplicity)

    def row_losses(self, out: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each row's L1: ``out``, ``target`` ``[R, C_t, *S]`` -> ``[R]`` float32."""
        return (out.float() - target.float()).abs().flatten(1).mean(1)
