"""The objects one federated training phase's rounds share on the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from flwr.app import ArrayRecord
from torch import nn

from meddiff.ema import EMA
from meddiff.recipes.phases import TrainingPhase


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Float32 tensors of an aggregated ``ArrayRecord`` (the strategy may return float64)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in record.to_torch_state_dict().items()}


@dataclass
class PhaseRun:
    """The objects one phase's rounds share."""

    phase: TrainingPhase
    model: nn.Module
    ema: Optional[EMA]
    strategy: object
    global_state: dict
    sample_model: Optional[nn.Module]
