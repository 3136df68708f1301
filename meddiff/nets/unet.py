"""ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", arXiv 2105.05233).

A pure function ``unet(x_t, t, y) -> eps | v | x0``: the diffusion process and
samplers take it as an argument. Works on 2-D images and 3-D volumes (``spatial_dims``), any number
of input/output channels, optionally class-conditional with an extra *null* label for
classifier-free guidance (Ho & Salimans 2022).
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

    Shapes:
        ``x``: ``[N, in_channels, *spatial]`` with each spatial side divisible by
        ``2 ** (len(channel_mult) - 1)``; ``t``: ``[N]`` (or a scalar); ``y``: ``[N]`` long or None.
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
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        bad_levels = [lvl for lvl in attention_levels if not 0 <= lvl < len(channel_mult)]
        if bad_levels:
            raise ValueError(f"attention_levels {bad_levels} outside 0..{len(channel_mult) - 1}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.num_levels = len(channel_mult)
        emb_ch = 4 * model_channels

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        self.label_embed = nn.Embedding(num_classes + 1, emb_ch) if num_classes > 0 else None

        def res(cin: int, cout: int, resample: Optional[str] = None) -> ResBlock:
            return ResBlock(
                spatial_dims=spatial_dims,
                in_channels=cin,
                out_channels=cout,
                emb_channels=emb_ch,
                dropout=dropout,
                norm_groups=norm_groups,
                resample=resample,
            )

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_head_channels=num_head_channels, norm_groups=norm_groups)

        self.conv_in = conv_nd(spatial_dims, in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers.append(attn(ch))
                self.down.append(TimestepSequential(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, "down") if resblock_updown else ConvResample(spatial_dims, ch, "down")
                self.down.append(TimestepSequential([down]))
                skip_channels.append(ch)

        self.middle = TimestepSequential([res(ch, ch), attn(ch), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, "up") if resblock_updown else ConvResample(spatial_dims, ch, "up"))
                self.up.append(TimestepSequential(layers))

        self.out_norm = group_norm(ch, norm_groups)
        self.conv_out = zero_module(conv_nd(spatial_dims, ch, out_channels, 3, padding=1))

    @property
    def null_label(self) -> int:
        """The label index that means "no class" (classifier-free guidance)."""
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
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
