"""Building blocks of the ADM UNet (Dhariwal & Nichol 2021, arXiv 2105.05233, Sec. 3 and App. A).

Every learned parameter lives in an ``nn.Conv{1,2,3}d``, ``nn.Linear``, ``nn.GroupNorm`` or
``nn.Embedding`` leaf module taking a single input, so that Opacus computes exact per-sample
gradients in ``hooks`` mode. Attention is written with
``F.scaled_dot_product_attention`` rather than ``nn.MultiheadAttention`` (whose Opacus replacement
is numerically wrong in Opacus 1.6). No reshape uses ``-1`` against the batch dimension, so empty
Poisson batches (N = 0) pass through.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def conv_nd(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    if spatial_dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if spatial_dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``.

    Plain ``nn.GroupNorm`` (not a subclass) keeps Opacus's per-sample gradient fast path.
    """
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-5)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (ADM's zero-initialised output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017; ADM).

    Args:
        t: ``[N]`` timesteps.
        dim: embedding width.
    Returns:
        ``[N, dim]`` float32 tensor ``[cos(t * f_i), sin(t * f_i)]`` with
        ``f_i = max_period ** (-i / half)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Resample(nn.Module):
    """Parameter-free 2x nearest up-sampling or 2x average-pool down-sampling (BigGAN resblocks)."""

    def __init__(self, spatial_dims: int, mode: str):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        self.spatial_dims = spatial_dims
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        return pool(x, kernel_size=2, stride=2)


class ConvResample(nn.Module):
    """Conventional resampling with a convolution (used when ``resblock_updown`` is off)."""

    def __init__(self, spatial_dims: int, channels: int, mode: str):
        super().__init__()
        self.mode = mode
        stride = 2 if mode == "down" else 1
        self.conv = conv_nd(spatial_dims, channels, channels, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class ResBlock(nn.Module):
    """Residual block with adaptive group normalisation (AdaGN, ADM Sec. 3, eq. in App. A).

    ``AdaGN(h, e) = GroupNorm(h) * (1 + e_s) + e_b`` where ``(e_s, e_b) = Linear(SiLU(emb))``.
    With ``up``/``down`` it is the BigGAN-style residual resampling block (Brock et al. 2019).

    Shapes: ``x`` is ``[N, C_in, *spatial]``, ``emb_act`` is ``[N, E]`` (already SiLU-activated);
    returns ``[N, C_out, *spatial']``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        norm_groups: int = 32,
        resample: Optional[str] = None,
    ):
        super().__init__()
        self.in_norm = group_norm(in_channels, norm_groups)
        self.in_conv = conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.out_norm = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_conv = zero_module(conv_nd(spatial_dims, out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else conv_nd(spatial_dims, in_channels, out_channels, 1)
        self.resample = Resample(spatial_dims, resample) if resample else None
        self._emb_shape = (2 * out_channels,) + (1,) * spatial_dims

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = self.in_conv(h)
        scale_shift = self.emb_proj(emb_act).reshape(emb_act.shape[0], *self._emb_shape)
        scale, shift = scale_shift.chunk(2, dim=1)
        h = torch.addcmul(shift, self.out_norm(h), scale + 1.0)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions (ADM; Vaswani et al. 2017).

    ``x + Proj(Attention(QKV(GroupNorm(x))))`` with the projection zero-initialised. Q, K and V come
    from one ``nn.Linear`` on the ``[N, L, C]`` token view; the softmax math is
    ``F.scaled_dot_product_attention``, which has no parameters.

    Shapes: ``x`` is ``[N, C, *spatial]``; returns the same shape.
    """

    def __init__(self, channels: int, *, num_head_channels: int = 32, norm_groups: int = 32):
        super().__init__()
        if channels % num_head_channels and channels > num_head_channels:
            raise ValueError(f"channels ({channels}) must be a multiple of num_head_channels ({num_head_channels})")
        self.num_heads = max(1, channels // num_head_channels)
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        length = math.prod(spatial)
        heads = self.num_heads
        tokens = self.norm(x).reshape(n, c, length).transpose(1, 2)  # [N, L, C]
        qkv = self.qkv(tokens).reshape(n, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [N, heads, L, C/heads]
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(n, length, c)
        out = self.proj(a).transpose(1, 2).reshape(n, c, *spatial)
        return x + out


class TimestepSequential(nn.ModuleList):
    """Applies its layers in order, passing the embedding to those that take it (ResBlocks)."""

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:  # noqa: D401
        for layer in self:
            x = layer(x, emb_act) if isinstance(layer, ResBlock) else layer(x)
        return x
