"""The hospital ClientApp: a thin adapter over :mod:`client.handlers`."""

from __future__ import annotations

import logging

import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from client.handlers import failure_reply, handle_evaluate, handle_query, handle_train
from protocol import Refusal, central_dp_mode, reply_kind

_SITE_LOG = logging.getLogger("meddiff.site")
_SITE_LOG.setLevel(logging.INFO)
if not _SITE_LOG.handlers:  # site progress and errors in the SuperNode's log
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[meddiff] %(message)s"))
    _SITE_LOG.addHandler(_handler)
    _SITE_LOG.propagate = False


def central_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` (or ``adaptiveclipping_mod``) when the server runs central DP.

    Applied only when the server's train config carries a clipping norm (``privacy.central_dp``),
    so one ClientApp serves both kinds of run. A budget refusal carries no weights and passes
    through unchanged (the stock mods would turn it into an error reply).
    """
    mode = central_dp_mode(msg.content) if msg.metadata.message_type == MessageType.TRAIN else None
    if mode is None:
        return call_next(msg, context)
    out = call_next(msg, context)
    if out.has_error() or reply_kind(out) is Refusal:
        return out
    mod = adaptiveclipping_mod if mode == "adaptive" else fixedclipping_mod
    return mod(msg, context, lambda _msg, _ctx: out)


app = ClientApp(mods=[central_dp_mod])


def _threads(context: Context) -> None:
    # One thread per simulated site on small machines; real sites use what they have.
    if "partition-id" in context.node_config:
        torch.set_num_threads(1)


def _handle(handler, msg: Message, context: Context) -> Message:
    """Run ``handler``; an error becomes a failure reply that names it (and carries the traceback)."""
    _threads(context)
    node_config = dict(context.node_config)
    try:
        content = handler(msg.content, node_config, context.state)
    except Exception as exc:  # noqa: BLE001 - any site error is reported, never a bare crash
        content = failure_reply(node_config, exc, msg.metadata.message_type).to_record()
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(handle_train, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(handle_evaluate, msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _handle(handle_query, msg, context)
