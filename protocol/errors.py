"""The error a malformed message raises, and the look-ups that raise it."""

from __future__ import annotations

from typing import Union

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text names the missing record or key."""


def content_of(message_or_content: Union[Message, RecordDict]) -> RecordDict:
    """The RecordDict of a message (or the RecordDict itself)."""
    if isinstance(message_or_content, Message):
        if message_or_content.has_error():
            raise ProtocolError(f"an error reply carries no content: {message_or_content.error.reason}")
        return message_or_content.content
    return message_or_content


def config_record(content: Union[RecordDict, ConfigRecord], name: str) -> ConfigRecord:
    """The ConfigRecord ``name`` of ``content`` (a ConfigRecord is returned as it is)."""
    if isinstance(content, ConfigRecord):
        return content
    if name not in content.config_records:
        raise ProtocolError(f"the message holds no ConfigRecord {name!r}")
    return content.config_records[name]


def array_record(content: RecordDict, name: str) -> ArrayRecord:
    if name not in content.array_records:
        raise ProtocolError(f"the message holds no ArrayRecord {name!r}")
    return content.array_records[name]


def metric_values(content: RecordDict, name: str) -> dict:
    """The MetricRecord ``name`` as a dict."""
    if name not in content.metric_records:
        raise ProtocolError(f"the reply holds no MetricRecord {name!r}")
    record: MetricRecord = content.metric_records[name]
    return dict(record)


def require_keys(values, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in values]
    if missing:
        raise ProtocolError(f"{where} lacks the key(s) {missing}")
