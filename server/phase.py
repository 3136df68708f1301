"""One federated training phase (what is trained, for how many rounds, how it is saved) and the
objects its rounds share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from flwr.app import ArrayRecord
from torch import nn

from meddiff.ema import EMA


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Float32 tensors of an aggregated ``ArrayRecord`` (the strategy may return float64)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in record.to_torch_state_dict().items()}


@dataclass
class Phase:
    """One federated training phase: what is trained, for how many rounds, how it is saved."""

    name: str                              # "autoencoder" | "diffusion"
    num_rounds: int
    build: Callable[[], nn.Module]
    checkpoint_prefix: str                 # "ae_round" | "round"
    ema_decay: Optional[float]             # server EMA of the global weights (None: none)
    samples: bool                          # draw sample grids (the diffusion phase)


@dataclass
class PhaseRun:
    """The objects one phase's rounds share."""

    phase: Phase
    model: nn.Module
    ema: Optional[EMA]
    strategy: object
    global_state: dict
    sample_model: Optional[nn.Module]
