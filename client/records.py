"""Encoding of weights and metrics in Flower records (Message API)."""

from __future__ import annotations

from typing import Mapping

import torch
from flwr.app import ArrayRecord, MetricRecord


TRANSPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

#: Every train reply carries exactly these metric keys, from every site (the reply contract).
TRAIN_METRIC_KEYS = ("num-examples", "train_loss", "steps", "site-index", "seconds", "epsilon", "delta", "noise_multiplier",
                     "sample_rate", "clip_fraction", "budget_exhausted")
EVALUATE_METRIC_KEYS = ("num-examples", "eval_loss", "site-index", "feature-count")
QUERY_METRIC_KEYS = ("site-index", "installed", "count", "total", "total-sq")


def state_to_arrays(state: Mapping[str, torch.Tensor], transport_dtype: str = "fp32") -> ArrayRecord:
    """An ``ArrayRecord`` of the unwrapped state dict; floating tensors cast to the transport dtype.

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
    """Float32 tensors from an ``ArrayRecord`` (fp16 transport is upcast)."""
    state = record.to_torch_state_dict()
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def metric_record(values: Mapping[str, float], keys: tuple[str, ...]) -> MetricRecord:
    """A ``MetricRecord`` with exactly ``keys`` (a missing key is a programming error)."""
    missing = [k for k in keys if k not in values]
    if missing:
        raise KeyError(f"metrics {missing} missing from the reply")
    return MetricRecord({k: float(values[k]) if isinstance(values[k], float) else values[k] for k in keys})
