"""Model weights on the wire: one ``ArrayRecord`` of a plain model's state dict."""

from __future__ import annotations

from typing import Mapping

import torch
from flwr.app import ArrayRecord

TRANSPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def state_to_arrays(state: Mapping[str, torch.Tensor], transport_dtype: str = "fp32") -> ArrayRecord:
    """An ``ArrayRecord`` of ``state``; floating tensors cast to the transport dtype.

    Only a plain model's weights cross the process boundary, never a DP wrapper's.
    bfloat16 is not accepted by ``ArrayRecord``; use fp16 for half-size transport.
    """
    if transport_dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport dtype must be one of {sorted(TRANSPORT_DTYPES)}, got {transport_dtype!r}")
    dtype = TRANSPORT_DTYPES[transport_dtype]
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        out[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    return ArrayRecord(out)


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Float32 tensors from an ``ArrayRecord`` (fp16 transport, or a strategy's float64, is cast)."""
    state = record.to_torch_state_dict()
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def exact_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``state`` in its own dtypes (weights checked against their digest)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})
