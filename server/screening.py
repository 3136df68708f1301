"""Screening of site updates before aggregation: nothing a site sends can crash the server.

The round loop calls :func:`screen` on the train replies and hands only the accepted ones, in
site order and in float32, to a plain Flower strategy's ``aggregate_train``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from protocol import SITE_INDEX, ProtocolError, TrainRes, replace_update_arrays

log = logging.getLogger("meddiff.server")

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def check_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Optional[str]:
    """The reason an update is unusable, or None: key set, shape, dtype and finiteness."""
    missing = sorted(set(reference) - set(update))
    unexpected = sorted(set(update) - set(reference))
    if missing or unexpected:
        return f"wrong key set (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})"
    for k, ref in reference.items():
        a = update[k]
        if tuple(a.shape) != tuple(ref.shape):
            return f"'{k}' has shape {tuple(a.shape)}, expected {tuple(ref.shape)}"
        if np.issubdtype(ref.dtype, np.floating):
            if a.dtype.type not in FLOAT_DTYPES:
                return f"'{k}' has dtype {a.dtype}, expected a float type"
            if not np.isfinite(a).all():
                return f"'{k}' contains NaN or Inf"
        elif a.dtype != ref.dtype:
            return f"'{k}' has dtype {a.dtype}, expected {ref.dtype}"
    return None


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over all floating tensors."""
    total = 0.0
    for k, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            total += float(np.sum((update[k].astype(np.float64) - ref.astype(np.float64)) ** 2))
    return total**0.5


def screen_updates(
    updates: Mapping[str, Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    *,
    norm_factor: float = 10.0,
) -> tuple[list[str], dict[str, str]]:
    """Split updates (by site label) into accepted labels and ``{label: reason}`` rejections.

    An update is rejected for a wrong key set, shape or dtype, for NaN/Inf, or when its distance
    from the current global model exceeds ``norm_factor`` times the round's median distance
    (checked once at least three updates pass the other tests).
    """
    rejected: dict[str, str] = {}
    passed = []
    for label, update in updates.items():
        reason = check_update(update, reference)
        if reason:
            rejected[label] = reason
        else:
            passed.append(label)
    if len(passed) >= 3 and norm_factor > 0:
        norms = {label: update_norm(updates[label], reference) for label in passed}
        median = float(np.median(list(norms.values())))
        for label in list(passed):
            if median > 0 and norms[label] > norm_factor * median:
                rejected[label] = f"update norm {norms[label]:.4g} exceeds {norm_factor:g}x the round median {median:.4g}"
                passed.remove(label)
    return passed, rejected


@dataclass
class Screened:
    """One round's train replies after screening: the accepted updates (site order, float32
    arrays) and one report entry per reply (``node``, ``site``, ``accepted``, ``reason``, metrics)."""

    accepted: list[Message] = field(default_factory=list)
    report: list[dict] = field(default_factory=list)


def _decode(msg: Message) -> tuple[Optional[TrainRes], Optional[dict[str, np.ndarray]], str]:
    """``(update, its arrays as numpy, "")`` or ``(update or None, None, reason)``."""
    try:
        update = TrainRes.from_record(msg.content)
    except ProtocolError as exc:
        return None, None, str(exc)
    try:
        return update, {k: np.asarray(v.numpy()) for k, v in update.arrays.items()}, ""
    except Exception as exc:  # noqa: BLE001 - whatever a site sent, it must not crash the server
        return update, None, f"undecodable arrays: {exc}"


def screen(server_round: int, replies: Iterable[Message], reference: Mapping[str, np.ndarray], *,
           norm_factor: float, frozen: Optional[Mapping[str, np.ndarray]] = None) -> Screened:
    """Decode and check each update against ``reference`` (the global values of the tensors an
    update carries, :func:`screen_updates`); see :class:`Screened`. With ``frozen`` (the global
    values of the tensors that do not train), each accepted update is completed with them, so
    any strategy aggregates whole models; the frozen values are the same for every site."""
    out, updates, messages, metrics = Screened(), {}, {}, {}
    for msg in replies:
        node = msg.metadata.src_node_id
        update, arrays, problem = _decode(msg)
        if problem:
            out.report.append({"node": node, "site": update.site_index if update else -1, "accepted": False,
                               "reason": problem})
            continue
        label = f"site {update.site_index} (node {node})"
        updates[label], messages[label], metrics[label] = arrays, msg, dict(update.metrics)
    accepted, rejected = screen_updates(updates, reference, norm_factor=norm_factor)
    for label in updates:
        reason = rejected.get(label, "")
        if reason:
            log.warning("round %d: rejected update from %s: %s", server_round, label, reason)
        out.report.append({"node": messages[label].metadata.src_node_id, "site": int(metrics[label].get(SITE_INDEX, -1)),
                           "accepted": not reason, "reason": reason, **metrics[label]})
    accepted.sort(key=lambda lab: (metrics[lab].get(SITE_INDEX, -1), messages[lab].metadata.src_node_id))
    for label in accepted:  # aggregate in float32 whatever the transport dtype
        whole = {**(frozen or {}), **updates[label]}
        replace_update_arrays(messages[label], ArrayRecord({k: torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v)
                                                            for k, v in whole.items()}))
        out.accepted.append(messages[label])
    return out


def aggregate(strategy, server_round: int, screened: Screened, *, min_valid: int) -> Optional[ArrayRecord]:
    """The strategy's aggregate of the accepted updates, or None (the previous global model stays)
    when fewer than ``min_valid`` passed screening."""
    if len(screened.accepted) < min_valid:
        log.warning("round %d: only %d valid update(s), fewer than min_train_nodes=%d; keeping the previous global model",
                    server_round, len(screened.accepted), min_valid)
        return None
    arrays, _ = strategy.aggregate_train(server_round, screened.accepted)
    return arrays
