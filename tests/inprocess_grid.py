"""A Flower ``Grid`` that delivers each message to the real ClientApp in this process.

The server's round loop runs against it exactly as against a SuperLink, without starting one:
the sites are the real ``client.client_app`` functions with their own ``Context`` (node config
and persistent state), and a node can be made to go offline mid-round, as Flower reports it.
"""

from __future__ import annotations

from typing import Iterable, Optional

from flwr.app import Context, Error, Message, MessageType, RecordDict

from client.client_app import evaluate, query, train
from protocol import RoundConfig
from server.replies import NODE_UNAVAILABLE
from tests.flower_helpers import as_node

HANDLERS = {MessageType.TRAIN: train, MessageType.EVALUATE: evaluate, MessageType.QUERY: query}


class InProcessGrid:
    """``node_configs``: ``{node_id: node_config}``. ``lose_after_train``: ``{node_id: round}`` --
    the node goes offline while training that round (its reply is Flower's NODE_UNAVAILABLE
    error) and is gone from then on."""

    def __init__(self, node_configs: dict[int, dict], *, lose_after_train: Optional[dict[int, int]] = None):
        self.node_configs = node_configs
        self.states = {n: RecordDict() for n in node_configs}
        self.lose = dict(lose_after_train or {})
        self.offline: set[int] = set()
        self.sent: list[tuple[str, int]] = []

    def get_node_ids(self) -> list[int]:
        return sorted(set(self.node_configs) - self.offline)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> list[Message]:
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Grid.push_messages does
            self.sent.append((kind, node))
            as_node(node)
            lost = kind == MessageType.TRAIN and node in self.lose and \
                RoundConfig.from_record(msg.content).server_round == self.lose[node]
            if node in self.offline or lost:
                self.offline.add(node)
                as_node(0)  # the SuperLink, not the lost node, writes this reply
                replies.append(Message(error=Error(code=NODE_UNAVAILABLE, reason="node unavailable"), reply_to=msg))
            else:
                ctx = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=self.states[node],
                              run_config={})
                replies.append(HANDLERS[kind](msg, ctx))
            as_node(0)
        return replies
