"""The objects one federated training phase's rounds share on the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from meddiff.ema import EMA
from meddiff.nets.trainable import trainable_summary, update_keys
from meddiff.recipes.phases import TrainingPhase


@dataclass
class PhaseRun:
    """The objects one phase's rounds share; ``update_keys`` are the tensors a site's update
    carries (all of them, or only the trainable ones under ``train.trainable``)."""

    phase: TrainingPhase
    model: nn.Module
    ema: Optional[EMA]
    strategy: object
    global_state: dict
    sample_model: Optional[nn.Module]
    update_keys: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.update_keys:
            self.update_keys = update_keys(self.model)

    def merged(self, aggregate: dict) -> dict:
        """The global weights with the updated tensors replaced by ``aggregate``'s (frozen ones kept)."""
        return {k: aggregate[k] if k in self.update_keys else v for k, v in self.global_state.items()}

    def trainable_note(self) -> str:
        """``"; training 67072 of 794161 parameters (8.4%)"`` when not every parameter trains."""
        counts = trainable_summary(self.model)
        if counts["trainable"] == counts["total"]:
            return ""
        return f"; training {counts['trainable']} of {counts['total']} parameters ({100 * counts['trainable'] / counts['total']:.1f}%)"
