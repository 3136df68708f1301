"""ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", arXiv 2105.05233).

A pure function ``unet(x_t, t, y) -> eps | v | x0``: the diffusion process and
samplers take it as an argument. Works on 2-D images and 3-D volumes (``spatial_dims``), any number
of input/output channels, optionally class-conditional with an extra *null* label for
classifier-free guidance (Ho & Salimans 2022), and optionally spatially conditioned: a conditioning
image (a segmentation mask, one channel per region) is concatenated to ``x_t`` as extra input
channels, as Med-DDPM does for mask-to-image synthesis (Dorjsembe et al. 2024, "Conditional
Diffusion Models for Semantic 3D Brain MRI Synthesis", IEEE JBHI, Sec. III-B).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meddiff.nets.blocks import (
    AttentionBlock,
    ConvResample,
    ResBlock,
    TimestepSequential,
    conv_nd,
    group_norm,
    timestep_embedding,
    zero_module,
)


class ADMUNet(nn.Module):
    """The ADM denoising UNet.

    Args:
        spatial_dims: 2 (images) or 3 (volumes).
        in_channels / out_channels: channels of ``x_t`` and of the prediction.
        model_channels: width of the first level.
        channel_mult: width multiplier of each resolution level; level ``i`` runs at ``1 / 2**i``
            of the input size.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: indices of the levels (0 = full resolution) that get self-attention.
        num_head_channels: channels per attention head.
        dropout: dropout probability inside residual blocks.
        num_classes: 0 for an unconditional model; otherwise labels ``0..num_classes-1`` plus the
            null label ``num_classes`` used for classifier-free guidance.
        resblock_updown: BigGAN-style residual up/down-sampling instead of (strided) convolutions.
        norm_groups: GroupNorm groups (reduced per layer to a divisor of its width).
        cond_channels: channels of a conditioning image concatenated to ``x_t`` (0: none). Real
            conditions take values in {-1, +1}; the all-zero image is the *null* condition, the
            spatial counterpart of the null label for classifier-free guidance.

    Shapes:
        ``x``: ``[N, in_channels, *spatial]`` with each spatial side divisible by
        ``2 ** (len(channel_mult) - 1)``, or ``[N, in_channels + cond_channels, *spatial]`` with
        the condition already concatenated; ``t``: ``[N]`` (or a scalar); ``y``: ``[N]`` long or
        None; ``cond``: ``[N, cond_channels, *spatial]`` or None (the null condition).
        Returns ``[N, out_channels, *spatial]``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1, 2),
        num_head_channels: int = 32,
        dropout: float = 0.0,
        num_classes: int = 0,
        resblock_updown: bool = True,
        norm_groups: int = 32,
        cond_channels: int = 0,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        bad_levels = [lvl for lvl in attention_levels if not 0 <= lvl < len(channel_mult)]
        if bad_levels:
            raise ValueError(f"attention_levels {bad_levels} outside 0..{len(channel_mult) - 1}")
        if cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {cond_channels}")
        self.cond_channels = cond_channels
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.num_levels = len(channel_mult)
        emb_ch = 4 * model_channels
        self._block_args = dict(spatial_dims=spatial_dims, emb_channels=emb_ch, dropout=dropout, norm_groups=norm_groups)
        self._attn_args = dict(num_head_channels=num_head_channels, norm_groups=norm_groups)
        self._resblock_updown = resblock_updown

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        self.label_embed = nn.Embedding(num_classes + 1, emb_ch) if num_classes > 0 else None
        self.conv_in = conv_nd(spatial_dims, in_channels + cond_channels, model_channels, 3, padding=1)
        widths = [mult * model_channels for mult in channel_mult]
        self.down, skip_channels = self._encoder(widths, num_res_blocks, attention_levels)
        ch = widths[-1]
        self.middle = TimestepSequential([self._res(ch, ch), self._attn(ch), self._res(ch, ch)])
        self.up = self._decoder(widths, num_res_blocks, attention_levels, skip_channels)
        self.out_norm = group_norm(widths[0], norm_groups)
        self.conv_out = zero_module(conv_nd(spatial_dims, widths[0], out_channels, 3, padding=1))

    def _res(self, cin: int, cout: int, resample: Optional[str] = None) -> ResBlock:
        return ResBlock(in_channels=cin, out_channels=cout, resample=resample, **self._block_args)

    def _attn(self, ch: int) -> AttentionBlock:
        return AttentionBlock(ch, **self._attn_args)

    def _resample(self, ch: int, direction: str) -> nn.Module:
        if self._resblock_updown:
            return self._res(ch, ch, direction)
        return ConvResample(self._block_args["spatial_dims"], ch, direction)

    def _encoder(self, widths: list[int], num_res_blocks: int,
                 attention_levels: Sequence[int]) -> tuple[nn.ModuleList, list[int]]:
        """The down path and the channels of each skip connection it leaves (input side first)."""
        blocks, skips, ch = nn.ModuleList(), [self.model_channels], self.model_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers = [self._res(ch, width)] + ([self._attn(width)] if level in attention_levels else [])
                ch = width
                blocks.append(TimestepSequential(layers))
                skips.append(ch)
            if level != len(widths) - 1:
                blocks.append(TimestepSequential([self._resample(ch, "down")]))
                skips.append(ch)
        return blocks, skips

    def _decoder(self, widths: list[int], num_res_blocks: int, attention_levels: Sequence[int],
                 skips: list[int]) -> nn.ModuleList:
        """The up path, consuming ``skips`` from the deepest one."""
        blocks, ch = nn.ModuleList(), widths[-1]
        for level in reversed(range(len(widths))):
            for i in range(num_res_blocks + 1):
                layers = [self._res(ch + skips.pop(), widths[level])]
                ch = widths[level]
                if level in attention_levels:
                    layers.append(self._attn(ch))
                if level and i == num_res_blocks:
                    layers.append(self._resample(ch, "up"))
                blocks.append(TimestepSequential(layers))
        return blocks

    @property
    def null_label(self) -> int:
        """The label index that means "no class" (classifier-free guidance)."""
        return self.num_classes

    def with_condition(self, x: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """``x`` with the conditioning channels concatenated (zeros, the null condition, for None)."""
        if x.shape[1] == self.in_channels + self.cond_channels and cond is None:
            return x  # already concatenated (the training objective's packed input)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels; this UNet takes {self.in_channels} (+ {self.cond_channels} "
                             "conditioning channels, concatenated or passed as cond)")
        if cond is None:
            return x if not self.cond_channels else torch.cat([x, x.new_zeros(x.shape[0], self.cond_channels, *x.shape[2:])], 1)
        if not self.cond_channels or cond.shape[1] != self.cond_channels or cond.shape[2:] != x.shape[2:]:
            raise ValueError(f"cond of shape {tuple(cond.shape)} does not fit a UNet with {self.cond_channels} conditioning "
                             f"channel(s) on x of shape {tuple(x.shape)}")
        return torch.cat([x, cond.to(x.dtype)], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.with_condition(x, cond)
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(n)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if self.label_embed is not None:
            if y is None:
                y = torch.full((n,), self.null_label, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(y)
        elif y is not None:
            raise ValueError("labels were given to an unconditional model (model.num_classes = 0)")
        emb_act = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb_act)
            skips.append(h)
        h = self.middle(h, emb_act)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb_act)
        return self.conv_out(F.silu(self.out_norm(h)))
