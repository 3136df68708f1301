"""KL-regularised autoencoder for latent diffusion, 2-D and 3-D, and its per-example objective.

The first stage of a latent diffusion model (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", arXiv 2112.10752, Sec. 3.1 and App. G): an encoder maps an image
``x [N, C, *S]`` to a Gaussian ``q(z|x) = N(mu, sigma^2)`` over latents ``[N, L, *S/f]``, a decoder
maps ``z`` back, and training minimises an L1 reconstruction plus a small KL pull towards
``N(0, I)`` (the variational bound of Kingma & Welling 2014, eq. 10, down-weighted).

Why MONAI's ``AutoencoderKL`` (MONAI Generative, Pinaya et al. 2023) and not our own: it is the
maintained medical implementation, 2-D and 3-D by ``spatial_dims``, and every learned parameter
sits in a plain ``nn.Conv{2,3}d`` or ``nn.GroupNorm`` leaf, so Opacus's ``ModuleValidator`` passes
and its ``hooks`` mode computes exact per-sample gradients (tested against one-image-at-a-time
autograd). :class:`KLAutoencoder` only adds what DP-SGD and reproducible federated rounds need:
the reparameterisation noise is an argument (seeded, never a hidden ``randn_like``), and empty
Poisson batches pass through. MONAI's attention blocks reshape with ``-1`` against the batch and
fail on an empty batch, so ``attention`` is refused under DP by the config layer.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn


class KLAutoencoder(nn.Module):
    """MONAI ``AutoencoderKL`` with explicit noise.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (the decoder outputs as many).
        latent_channels: ``L``, channels of the latent.
        channels: width per level; ``len(channels) - 1`` halvings, so ``f = 2 ** (len - 1)``.
        num_res_blocks: residual blocks per level.
        attention: self-attention in the encoder's and decoder's middle blocks.
        norm_groups: GroupNorm groups (must divide every width).

    Shapes:
        ``x [N, C, *S]`` with every side divisible by ``f``; latents ``[N, L, *S/f]``.
    """

    def __init__(self, *, spatial_dims: int = 2, in_channels: int = 1, latent_channels: int = 3,
                 channels: Sequence[int] = (32, 64, 64), num_res_blocks: int = 1, attention: bool = False,
                 norm_groups: int = 16):
        super().__init__()
        from monai.networks.nets import AutoencoderKL

        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.downsampling = 2 ** (len(channels) - 1)
        self.net = AutoencoderKL(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=in_channels, channels=tuple(channels),
            latent_channels=latent_channels, num_res_blocks=num_res_blocks, attention_levels=(False,) * len(channels),
            norm_num_groups=norm_groups, with_encoder_nonlocal_attn=attention, with_decoder_nonlocal_attn=attention,
        )

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """``[N, C, *S] -> [N, L, *S/f]``."""
        n, _, *spatial = image_shape
        bad = [s for s in spatial if s % self.downsampling]
        if bad:
            raise ValueError(f"image sides {spatial} must be divisible by the autoencoder's downsampling {self.downsampling}")
        return (n, self.latent_channels, *(s // self.downsampling for s in spatial))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, C, *S] -> (mu, sigma)``, each ``[N, L, *S/f]``."""
        return self.net.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [N, L, *S/f] -> x [N, C, *S]``."""
        return self.net.decode(z)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct through a sampled latent ``z = mu + sigma * noise`` (reparameterisation).

        Returns ``(reconstruction [N, C, *S], mu, sigma)``.
        """
        mu, sigma = self.encode(x)
        return self.decode(mu + sigma * noise), mu, sigma


def kl_per_example(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, sigma^2) || N(0, I))`` summed over latent elements: ``[N, ...] -> [N]``
    (Kingma & Welling 2014, App. B)."""
    var = sigma.float().pow(2)
    return 0.5 * (mu.float().pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1.0).flatten(1).sum(1)


class AutoencoderObjective:
    """The per-example autoencoder loss, with :meth:`GaussianDiffusion.training_losses`'s interface.

    ``loss_n = mean|x_n - x_hat_n| + kl_weight * KL_n + perceptual_weight * P_n`` where ``P_n`` is
    the mean squared distance between a frozen network's features of ``x_n`` and of ``x_hat_n``
    (3-D volumes: averaged over axial slices). Sharing the interface lets the plain training step,
    the training loop and Opacus's per-sample gradients serve both stages unchanged.

    Args:
        kl_weight: weight of the KL term (LDM uses about 1e-6).
        perceptual: ``features(images [M, C, H, W]) -> [M, D]``, a frozen network, or None.
        perceptual_weight: its weight (0 turns it off).
    """

    def __init__(self, *, kl_weight: float = 1e-6, perceptual: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 perceptual_weight: float = 0.0):
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual feature network")
        self.kl_weight = float(kl_weight)
        self.perceptual = perceptual
        self.perceptual_weight = float(perceptual_weight)

    def training_losses(self, model: nn.Module, x0: torch.Tensor, *, y: Optional[torch.Tensor] = None,
                        noise_multiplicity: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``x0 [N, C, *S]`` in [-1, 1] -> per-example loss ``[N]`` (float32). ``y`` and
        ``noise_multiplicity`` are accepted for interface compatibility and ignored."""
        shape = model.latent_shape(x0.shape)
        dev = generator.device if generator is not None else x0.device
        noise = torch.randn(shape, generator=generator, device=dev, dtype=x0.dtype).to(x0.device)
        recon, mu, sigma = model(x0, noise)
        loss = (recon.float() - x0.float()).abs().flatten(1).mean(1) + self.kl_weight * kl_per_example(mu, sigma)
        if self.perceptual_weight > 0 and x0.shape[0] > 0:
            loss = loss + self.perceptual_weight * self._perceptual(recon, x0)
        return loss

    def _perceptual(self, recon: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        n = x0.shape[0]
        if x0.ndim == 5:  # [N, C, D, H, W] -> axial slices [N*D, C, H, W]
            d = x0.shape[2]
            recon, x0 = (t.movedim(2, 1).reshape(n * d, *t.shape[1:2], *t.shape[3:]) for t in (recon, x0))
        with torch.no_grad():
            target = self.perceptual(x0.float())
        dist = (self.perceptual(recon.float()) - target).pow(2).mean(1)
        return dist.reshape(n, -1).mean(1)

    @torch.no_grad()
    def reconstruction_error(self, model: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        """Mean absolute error of the deterministic reconstruction ``decode(mu)``: ``[N]``."""
        mu, _ = model.encode(x0)
        return (model.decode(mu).float() - x0.float()).abs().flatten(1).mean(1)
