"""Networks: the ADM UNet and its blocks."""

from meddiff.nets.unet import ADMUNet

__all__ = ["ADMUNet"]
