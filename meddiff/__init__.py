"""meddiff: the plain-PyTorch diffusion core of meddiff-fl (no flwr, no opacus)."""

__version__ = "0.1.0"
