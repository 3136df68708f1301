"""What each site's reply to a round says, before any update reaches a strategy.

A reply is one of: an update (weights and metrics), a refusal (the site's privacy budget or
policy does not allow the round; metrics and a reason, no weights), a failure (the site raised
an error; a one-line reason and the traceback), a request for the phase-2 autoencoder, or a
Flower error reply (the node went offline mid-round, or the ClientApp crashed outside our
handlers). Every kind but the update becomes one report entry naming the site and the reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from flwr.app import Message

from protocol import SITE_INDEX, Failure, MissingAutoencoder, ProtocolError, Refusal, decode_reply, reply_kind, reply_metrics

log = logging.getLogger("meddiff.server")

#: Flower's error code for a message whose destination node went offline (missed heartbeats).
NODE_UNAVAILABLE = 5


@dataclass
class SortedReplies:
    """One round's replies by kind (see the module docstring)."""

    updates: list[Message] = field(default_factory=list)
    refusals: list[Message] = field(default_factory=list)
    failures: list[Message] = field(default_factory=list)
    missing_autoencoder: list[Message] = field(default_factory=list)
    errors: list[Message] = field(default_factory=list)


def sort_replies(replies: Iterable[Message]) -> SortedReplies:
    """By kind (:func:`protocol.reply_kind`); an update is decoded later, by the strategy's screening."""
    out = SortedReplies()
    for r in replies:
        if r.has_error():
            out.errors.append(r)
            continue
        kind = reply_kind(r)
        by_kind = {Failure: out.failures, Refusal: out.refusals, MissingAutoencoder: out.missing_autoencoder}
        by_kind.get(kind, out.updates).append(r)
    return out


def refusal_report(server_round: int, msg: Message) -> dict:
    node, refusal = msg.metadata.src_node_id, decode_reply(msg)
    reason = refusal.reason or "no reason given"
    log.warning("round %d: node %s refused: %s", server_round, node, reason)
    return {**refusal.metrics, "node": node, "site": refusal.site_index, "accepted": False, "refused": True,
            "reason": f"refused: {reason}"}


def failure_report(server_round: int, msg: Message, error_log: Path) -> dict:
    """A site's error: one line for ``metrics.csv``, the traceback appended to ``error_log``."""
    node, failure = msg.metadata.src_node_id, decode_reply(msg)
    site = failure.site_index
    reason = failure.reason or "unknown error"
    append_traceback(error_log, f"round {server_round}, site {site} (node {node})", failure.traceback)
    log.warning("round %d: site %s (node %s) failed: %s (traceback in %s)", server_round, site, node, reason, error_log)
    return {"node": node, "site": site, "accepted": False, "reason": f"failed: {reason}"}


def error_report(server_round: int, msg: Message, node_sites: dict[int, int], error_log: Path,
                 destinations: dict[str, int]) -> dict:
    """A Flower error reply: a lost node (offline mid-round), or a ClientApp that crashed.
    ``destinations`` maps the ids of the messages sent to their nodes (the SuperLink, not the
    node, writes the reply for a node that went offline)."""
    node = destinations.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
    site = node_sites.get(node, -1)
    if msg.error.code == NODE_UNAVAILABLE:
        reason = f"lost: node {node} went offline during the round (missed heartbeats); the round went on without it"
    else:
        first = (str(msg.error.reason).strip().splitlines() or ["no reason given"])[-1]
        reason = f"error reply: {first[:300]}"
        append_traceback(error_log, f"round {server_round}, node {node}", str(msg.error.reason))
    log.warning("round %d: site %s (node %s): %s", server_round, site, node, reason)
    return {"node": node, "site": site, "accepted": False, "reason": reason}


def missing_autoencoder_report(msg: Message) -> dict:
    node, missing = msg.metadata.src_node_id, decode_reply(msg)
    log.warning("node %s lacks the autoencoder; sending it again", node)
    return {**missing.metrics, "node": node, "site": missing.site_index, "accepted": False,
            "reason": "lacked the phase-1 autoencoder; sent again"}


def append_traceback(path: Path, where: str, text: str) -> None:
    if not text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(f"==== {where}\n{text.rstrip()}\n\n")


def learn_node_sites(replies: Iterable[Message], node_sites: dict[int, int]) -> None:
    """Remember which site each node is, from any reply that says so (to name lost nodes later)."""
    for r in replies:
        if not r.has_error() and SITE_INDEX in reply_metrics(r):
            node_sites[r.metadata.src_node_id] = int(reply_metrics(r)[SITE_INDEX])


def wait_for_nodes(live_nodes: Callable[[], list[int]], fed, rnd: int, poll: float = 1.0) -> str:
    """Wait up to ``fed.round_timeout`` seconds for ``fed.min_train_nodes`` connected sites (Flower
    itself would wait forever); ``""`` when they came, else the reason the run fails."""
    deadline = time.monotonic() + fed.round_timeout
    while len(live_nodes()) < fed.min_train_nodes:
        if time.monotonic() > deadline:
            return (f"failed before round {rnd}: only {len(live_nodes())} site(s) connected after waiting "
                    f"federation.round_timeout={fed.round_timeout:g} s, fewer than min_train_nodes={fed.min_train_nodes}")
        time.sleep(poll)
    return ""


def round_report(server_round: int, screened: list[dict], replies: SortedReplies, node_sites: dict[int, int],
                 error_log: Path, destinations: dict[str, int]) -> list[dict]:
    """One entry per reply of a training round: the screened updates' entries, then one for
    every refusal, failure, error reply and request for the autoencoder."""
    return (screened + [refusal_report(server_round, r) for r in replies.refusals]
            + [failure_report(server_round, r, error_log) for r in replies.failures]
            + [error_report(server_round, r, node_sites, error_log, destinations) for r in replies.errors]
            + [missing_autoencoder_report(r) for r in replies.missing_autoencoder])


def round_counts(report: list[dict], replies: SortedReplies, *, kept: bool) -> dict:
    """How many replies of each fate; ``kept``: the previous global model was kept."""
    counts = {"accepted": sum(r["accepted"] for r in report), "refused": len(replies.refusals),
              "failed": len(replies.failures), "lost": sum(r["reason"].startswith("lost") for r in report), "kept": kept}
    counts["rejected"] = len(report) - counts["accepted"] - counts["refused"] - counts["failed"] - counts["lost"]
    return counts


def expect_reply(reply: Message, expected: type, what: str) -> tuple[object, str]:
    """A site's reply decoded as ``expected``: ``(result, "")``; else ``(None, problem)``, or
    ``(failure, problem)`` when the site sent a :class:`Failure` (its traceback is in it)."""
    if reply.has_error():
        return None, (str(reply.error.reason).strip().splitlines() or ["error reply"])[-1]
    try:
        result = decode_reply(reply)
    except ProtocolError as exc:
        return None, str(exc)
    if isinstance(result, expected):
        return result, ""
    if isinstance(result, Failure):
        return result, result.reason or "failed"
    return None, f"a {type(result).__name__} reply does not answer {what}"
