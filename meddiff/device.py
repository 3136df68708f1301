"""Device selection and mixed precision."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return dev


def autocast_dtype(device: torch.device, mixed_precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype to use, or None for full fp32.

    ``auto`` means bf16 on CUDA GPUs that support it (no loss scaling needed) and fp32 on CPU,
    where bf16 autocast is slower on most processors.
    """
    if mixed_precision == "no":
        return None
    if mixed_precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("train.mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable[[], ContextManager]:
    """A zero-argument factory of autocast contexts (a null context when ``dtype`` is None)."""
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)
