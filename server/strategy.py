"""Strategy registry over ``flwr.serverapp.strategy``: plain Flower strategies, which aggregate
only what :func:`server.screening.screen` accepted."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from configs import FederationConfig, PrivacyConfig
log = logging.getLogger("meddiff.server")


STRATEGIES = {
    "fedavg": (FedAvg, lambda c: {}),
    "fedprox": (FedProx, lambda c: {"proximal_mu": c.proximal_mu}),
    "fedadam": (FedAdam, lambda c: {"eta": c.server_lr}),
    "fedyogi": (FedYogi, lambda c: {"eta": c.server_lr}),
    "fedmedian": (FedMedian, lambda c: {}),
    "fedtrimmedavg": (FedTrimmedAvg, lambda c: {"beta": 0.2}),
    "krum": (Krum, lambda c: {"num_malicious_nodes": 0}),
    "multikrum": (MultiKrum, lambda c: {"num_malicious_nodes": 0, "num_nodes_to_select": max(1, c.min_train_nodes)}),
}

#: Strategy attributes that must survive a restart (server-side optimiser moments).
STATEFUL_ATTRIBUTES = ("m_t", "v_t")


def create_strategy(fed: FederationConfig, privacy: Optional[PrivacyConfig] = None):
    """The strategy named by ``federation.strategy``, gated by ``min_train_nodes``; wrapped in
    Flower's client-side fixed or adaptive clipping DP strategy when ``privacy.central_dp`` asks.

    Central DP averages the sites' clipped updates with *equal* weights (weighted by ``steps``,
    which every site reports as ``federation.local_steps``): the noise std ``sigma * S / m`` is
    calibrated to one site's influence on an unweighted mean.
    """
    if fed.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {fed.strategy!r}; choose one of {sorted(STRATEGIES)}")
    cls, extra = STRATEGIES[fed.strategy]
    central = privacy.central_dp if privacy is not None else "off"
    weighting = {"weighted_by_key": "steps"} if central != "off" else {}
    strategy = cls(fraction_train=fed.fraction_train, fraction_evaluate=1.0, min_train_nodes=fed.min_train_nodes,
                   min_evaluate_nodes=fed.min_train_nodes, min_available_nodes=fed.min_train_nodes, **weighting, **extra(fed))
    if central == "fixed":
        return DifferentialPrivacyClientSideFixedClipping(strategy, privacy.central_noise_multiplier,
                                                          privacy.central_clipping_norm, sites_per_round(fed))
    if central == "adaptive":
        return DifferentialPrivacyClientSideAdaptiveClipping(strategy, privacy.central_noise_multiplier, sites_per_round(fed),
                                                             initial_clipping_norm=privacy.central_clipping_norm)
    return strategy


def sites_per_round(fed: FederationConfig) -> int:
    """Sites sampled per round, as Flower's sampling computes it for ``fraction_train``."""
    return max(fed.min_train_nodes, int(fed.num_sites * fed.fraction_train))


def base_strategy(strategy):
    """The aggregating strategy inside a central-DP wrapper (or the strategy itself)."""
    return getattr(strategy, "strategy", strategy)


def strategy_state(strategy) -> dict:
    """Tensors of the strategy's server-side state (e.g. FedAdam/FedYogi moments), for checkpoints."""
    out = {}
    for name in STATEFUL_ATTRIBUTES:
        value = getattr(strategy, name, None)
        if value:
            out[name] = {k: torch.from_numpy(np.asarray(v)) for k, v in value.items()}
    return out


def load_strategy_state(strategy, state: dict) -> None:
    for name, value in state.items():
        if name not in STATEFUL_ATTRIBUTES or not hasattr(strategy, name):
            raise ValueError(f"checkpoint holds strategy state {name!r} that {type(strategy).__name__} does not have")
        setattr(strategy, name, {k: v.numpy() for k, v in value.items()})
