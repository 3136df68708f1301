"""One federated training phase (what is trained, for how many rounds, how it is saved) and the
objects its rounds share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from meddiff.ema import EMA


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
