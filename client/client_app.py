"""The hospital ClientApp: a thin adapter over :mod:`client.handlers`."""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.handlers import handle_evaluate, handle_query, handle_train


def central_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` (or ``adaptiveclipping_mod``) when the server runs central DP.

    Applied only when the server's train config carries a clipping norm (``privacy.central_dp``),
    so one ClientApp serves both kinds of run. A budget refusal carries no weights and passes
    through unchanged (the stock mods would turn it into an error reply).
    """
    configs = list(msg.content.config_records.values())
    if msg.metadata.message_type != MessageType.TRAIN or not configs or KEY_CLIPPING_NORM not in configs[0]:
        return call_next(msg, context)
    out = call_next(msg, context)
    if out.has_error() or "refusal" in out.content.config_records:
        return out
    mod = adaptiveclipping_mod if str(configs[0].get("central-dp", "fixed")) == "adaptive" else fixedclipping_mod
    return mod(msg, context, lambda _msg, _ctx: out)


app = ClientApp(mods=[central_dp_mod])


def _threads(context: Context) -> None:
    # One thread per simulated site on small machines; real sites use what they have.
    if "partition-id" in context.node_config:
        torch.set_num_threads(1)


@app.train()
def train(msg: Message, context: Context) -> Message:
    _threads(context)
    return Message(content=handle_train(msg.content, dict(context.node_config), context.state), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _threads(context)
    return Message(content=handle_evaluate(msg.content, dict(context.node_config), context.state), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    _threads(context)
    return Message(content=handle_query(msg.content, dict(context.node_config), context.state), reply_to=msg)
