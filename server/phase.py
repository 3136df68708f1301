"""The objects one federated training phase's rounds share on the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from meddiff.ema import EMA
from meddiff.recipes.phases import TrainingPhase


@dataclass
class PhaseRun:
    """The objects one phase's rounds share."""

    phase: TrainingPhase
    model: nn.Module
    ema: Optional[EMA]
    strategy: object
    global_state: dict
    sample_model: Optional[nn.Module]
