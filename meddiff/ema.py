"""Exponential moving average of model weights (Polyak averaging, as used by DDPM/ADM)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class EMA:
    """Keeps float32 shadow copies of a model's parameters and buffers.

    ``shadow <- shadow + (1 - d) * (param - shadow)`` after every *real* optimizer step, with the
    warm-up ``d = min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the random
    initialisation. Keys are those of the plain model it averages (never a DP wrapper's).
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }
        self._params = list(model.named_parameters())

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards ``model``'s current weights."""
        d = self.current_decay()
        self.num_updates += 1
        names = [k for k, _ in self._params]
        shadow = [self.shadow[k] for k in names]
        params = [p.detach().float() for _, p in self._params]
        torch._foreach_lerp_(shadow, params, 1.0 - d)
        for k, buf in model.named_buffers():
            self.shadow[k].copy_(buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, with the keys of a freshly built model."""
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], num_updates: int = 0) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model; differing keys: {sorted(missing)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)
        self.num_updates = int(num_updates)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (in its own dtype)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
