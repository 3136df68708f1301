"""The hospital ClientApp: a thin adapter over :mod:`client.handlers`."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.handlers import handle_evaluate, handle_train

app = ClientApp()


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
    return Message(content=handle_evaluate(msg.content, dict(context.node_config)), reply_to=msg)
