"""Strategy registry over ``flwr.serverapp.strategy``, with update screening before aggregation."""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
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
from protocol import SITE_INDEX, ProtocolError, TrainRes, replace_update_arrays
from server.validation import screen_updates

log = logging.getLogger("meddiff.server")


class ScreenedAggregation:
    """Mixin: screen replies (:func:`screen_updates`), upcast fp16 transport, order by site, then
    hand the accepted replies to the flwr strategy's own ``aggregate_train``.

    ``self.reference`` (numpy arrays of the current global model) is set by the round loop before
    each round. After aggregation, ``self.round_report`` lists every reply with its fate.
    """

    reference: dict[str, np.ndarray] = {}
    norm_factor: float = 10.0
    min_valid: int = 1

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        self.round_report = []
        updates, messages, metrics = {}, {}, {}
        for msg in replies:
            node = msg.metadata.src_node_id
            label = f"node {node}"
            if msg.has_error():
                self.round_report.append({"node": node, "site": -1, "accepted": False, "reason": f"error reply: {msg.error.reason}"})
                continue
            try:
                update = TrainRes.from_record(msg.content)
            except ProtocolError as exc:
                self.round_report.append({"node": node, "site": -1, "accepted": False, "reason": str(exc)})
                continue
            label = f"site {update.site_index} (node {node})"
            try:
                updates[label] = {k: np.asarray(v.numpy()) for k, v in update.arrays.items()}
            except Exception as exc:  # undecodable arrays
                self.round_report.append({"node": node, "site": update.site_index, "accepted": False,
                                          "reason": f"undecodable arrays: {exc}"})
                continue
            messages[label], metrics[label] = msg, dict(update.metrics)
        accepted, rejected = screen_updates(updates, self.reference, norm_factor=self.norm_factor)
        for label in list(updates):
            m = metrics[label]
            reason = rejected.get(label, "")
            if reason:
                log.warning("round %d: rejected update from %s: %s", server_round, label, reason)
            self.round_report.append({"node": messages[label].metadata.src_node_id, "site": int(m.get(SITE_INDEX, -1)),
                                      "accepted": not reason, "reason": reason, **m})
        accepted.sort(key=lambda lab: (metrics[lab].get(SITE_INDEX, -1), messages[lab].metadata.src_node_id))
        if len(accepted) < self.min_valid:
            log.warning("round %d: only %d valid update(s), fewer than min_train_nodes=%d; keeping the previous global model",
                        server_round, len(accepted), self.min_valid)
            return None, None
        for lab in accepted:  # aggregate in float32 whatever the transport dtype
            replace_update_arrays(messages[lab], ArrayRecord({k: torch.from_numpy(v.astype(np.float32)) if v.dtype.kind == "f"
                                                              else torch.from_numpy(v) for k, v in updates[lab].items()}))
        return super().aggregate_train(server_round, [messages[lab] for lab in accepted])


class ScreenedFedAvg(ScreenedAggregation, FedAvg):
    pass


class ScreenedFedProx(ScreenedAggregation, FedProx):
    pass


class ScreenedFedAdam(ScreenedAggregation, FedAdam):
    pass


class ScreenedFedYogi(ScreenedAggregation, FedYogi):
    pass


class ScreenedFedMedian(ScreenedAggregation, FedMedian):
    pass


class ScreenedFedTrimmedAvg(ScreenedAggregation, FedTrimmedAvg):
    pass


class ScreenedKrum(ScreenedAggregation, Krum):
    pass


class ScreenedMultiKrum(ScreenedAggregation, MultiKrum):
    pass


STRATEGIES = {
    "fedavg": (ScreenedFedAvg, lambda c: {}),
    "fedprox": (ScreenedFedProx, lambda c: {"proximal_mu": c.proximal_mu}),
    "fedadam": (ScreenedFedAdam, lambda c: {"eta": c.server_lr}),
    "fedyogi": (ScreenedFedYogi, lambda c: {"eta": c.server_lr}),
    "fedmedian": (ScreenedFedMedian, lambda c: {}),
    "fedtrimmedavg": (ScreenedFedTrimmedAvg, lambda c: {"beta": 0.2}),
    "krum": (ScreenedKrum, lambda c: {"num_malicious_nodes": 0}),
    "multikrum": (ScreenedMultiKrum, lambda c: {"num_malicious_nodes": 0, "num_nodes_to_select": max(1, c.min_train_nodes)}),
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
    strategy.min_valid = fed.min_train_nodes
    if central == "fixed":
        return DifferentialPrivacyClientSideFixedClipping(strategy, privacy.central_noise_multiplier,
                                                          privacy.central_clipping_norm, sampled_sites(fed))
    if central == "adaptive":
        return DifferentialPrivacyClientSideAdaptiveClipping(strategy, privacy.central_noise_multiplier, sampled_sites(fed),
                                                             initial_clipping_norm=privacy.central_clipping_norm)
    return strategy


def sampled_sites(fed: FederationConfig) -> int:
    """Sites sampled per round, as Flower's sampling computes it for ``fraction_train``."""
    return max(fed.min_train_nodes, int(fed.num_sites * fed.fraction_train))


def base_strategy(strategy) -> ScreenedAggregation:
    """The screened strategy inside a DP wrapper (or the strategy itself)."""
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
