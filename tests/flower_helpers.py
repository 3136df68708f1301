"""Build real flwr Messages in-process, as the Flower runtime would."""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from protocol import RoundConfig, RoundIns


def as_node(node_id: int) -> None:
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = node_id


def server_message(cfg, state, *, dst: int, round_: int = 1, message_type=MessageType.TRAIN, **fields) -> Message:
    """A train or evaluate message as a Flower strategy builds it; ``fields`` of :class:`RoundConfig`."""
    as_node(0)
    content = RoundIns(ArrayRecord(state), RoundConfig(cfg, server_round=round_, **fields)).to_record()
    return Message(content=content, dst_node_id=dst, message_type=message_type)


def reply(msg: Message, content: RecordDict) -> Message:
    as_node(msg.metadata.dst_node_id)
    out = Message(content=content, reply_to=msg)
    as_node(0)
    return out


def train_reply(msg: Message, state, metrics: dict) -> Message:
    return reply(msg, RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}))
