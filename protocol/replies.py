"""What a site sends back: the typed replies, and how the server tells them apart."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from meddiff.evaluate.metrics import FeatureStats
from protocol.errors import ProtocolError, array_record, config_record, content_of, metric_values, require_keys
from protocol.keys import (ARRAYS, BUDGET_EXHAUSTED, DELTA, DIGEST, EPSILON, EVAL_LOSS, EVALUATE_METRIC_KEYS, FAILURE,
                           FEATURE_COUNT, FEATURE_COV, FEATURE_MEAN, FEATURE_STATS, INSTALLED, LEDGER, METRICS,
                           MISSING_AUTOENCODER, PRIVACY, REASON, REFUSAL, SEGMENTATION, SITE_INDEX, TRACEBACK,
                           TRAIN_METRIC_KEYS)
from protocol.metrics import failure_metrics, metric_record, non_private_metrics, train_metrics
from protocol.queries import QueryRes
from protocol.segmentation import SegmentationRes
from protocol.weights import arrays_to_state, state_to_arrays


class _SiteReply:
    """A reply whose metrics name the site."""

    metrics: Mapping[str, float]

    @property
    def site_index(self) -> int:
        """The replying site's index (-1 when the reply does not say)."""
        return int(self.metrics.get(SITE_INDEX, -1))


def _with_ledger(content: RecordDict, ledger: Optional[str]) -> RecordDict:
    if ledger is not None:
        content[PRIVACY] = ConfigRecord({LEDGER: ledger})
    return content


@dataclass(frozen=True)
class TrainRes(_SiteReply):
    """A site's update: the new weights, the round's metrics and, under DP, the site's ledger."""

    arrays: ArrayRecord
    metrics: Mapping[str, float]
    ledger: Optional[str] = None  # JSON

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], metrics: Mapping[str, float], *,
                     transport_dtype: str = "fp32", ledger: Optional[str] = None) -> "TrainRes":
        return cls(state_to_arrays(weights, transport_dtype), dict(metrics), ledger)

    def weights(self) -> dict[str, torch.Tensor]:
        return arrays_to_state(self.arrays)

    def to_record(self) -> RecordDict:
        return _with_ledger(RecordDict({ARRAYS: self.arrays, METRICS: metric_record(self.metrics, TRAIN_METRIC_KEYS)}),
                            self.ledger)

    @classmethod
    def from_record(cls, content: RecordDict) -> "TrainRes":
        """The metrics as sent (Flower's adaptive clipping adds one); the shape Flower aggregates is checked."""
        if (len(content.array_records) != 1 or len(content.metric_records) != 1 or ARRAYS not in content.array_records
                or METRICS not in content.metric_records):
            raise ProtocolError(f"reply must hold exactly one ArrayRecord {ARRAYS!r} and one MetricRecord")
        return cls(content.array_records[ARRAYS], dict(content.metric_records[METRICS]), reply_ledger(content))


@dataclass(frozen=True)
class Refusal(_SiteReply):
    """The site's privacy budget or policy does not allow the round: every train metric key
    (``budget_exhausted=1`` for a budget refusal), the reason, no weights."""

    metrics: Mapping[str, float]
    reason: str
    ledger: Optional[str] = None  # JSON, under DP

    @classmethod
    def for_site(cls, *, site_index: int, num_examples: int, reason: str, epsilon: float, exhausted: bool,
                 delta: Optional[float] = None, ledger: Optional[str] = None) -> "Refusal":
        privacy = {**non_private_metrics(), EPSILON: epsilon, BUDGET_EXHAUSTED: int(exhausted)}
        if delta is not None:
            privacy[DELTA] = delta
        return cls(train_metrics(num_examples=num_examples, train_loss=math.nan, steps=0, site_index=site_index,
                                 seconds=0.0, privacy=privacy), reason, ledger)

    def to_record(self) -> RecordDict:
        return _with_ledger(RecordDict({METRICS: metric_record(self.metrics, TRAIN_METRIC_KEYS),
                                        REFUSAL: ConfigRecord({REASON: self.reason})}), self.ledger)

    @classmethod
    def from_record(cls, content: RecordDict) -> "Refusal":
        return cls(reply_metrics(content), str(config_record(content, REFUSAL).get(REASON, "")), reply_ledger(content))


@dataclass(frozen=True)
class MissingAutoencoder(_SiteReply):
    """The site lacks the phase-2 autoencoder the server named: every train metric key, the digest."""

    metrics: Mapping[str, float]
    digest: str

    @classmethod
    def for_site(cls, *, site_index: int, num_examples: int, digest: str) -> "MissingAutoencoder":
        return cls(train_metrics(num_examples=num_examples, train_loss=math.nan, steps=0, site_index=site_index,
                                 seconds=0.0, privacy=non_private_metrics()), digest)

    def to_record(self) -> RecordDict:
        return RecordDict({METRICS: metric_record(self.metrics, TRAIN_METRIC_KEYS),
                           MISSING_AUTOENCODER: ConfigRecord({DIGEST: self.digest})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "MissingAutoencoder":
        return cls(reply_metrics(content), str(config_record(content, MISSING_AUTOENCODER).get(DIGEST, "")))


@dataclass(frozen=True)
class Failure(_SiteReply):
    """Handling a message raised at the site: every metric key of its reply kind, a one-line
    reason and the traceback; no weights."""

    metrics: Mapping[str, float]
    reason: str
    traceback: str

    @classmethod
    def for_message(cls, message_type: str, *, site_index: int, reason: str, traceback: str) -> "Failure":
        return cls(failure_metrics(message_type, site_index), reason, traceback)

    def to_record(self) -> RecordDict:
        return RecordDict({METRICS: metric_record(self.metrics, tuple(self.metrics)),
                           FAILURE: ConfigRecord({REASON: self.reason, TRACEBACK: self.traceback})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "Failure":
        record = config_record(content, FAILURE)
        return cls(reply_metrics(content), str(record.get(REASON, "")), str(record.get(TRACEBACK, "")))


@dataclass(frozen=True)
class EvaluateRes(_SiteReply):
    """The held-out loss of the global model at a site and, when the server asked, the site's
    feature statistics (their count travels as the metric ``feature-count``)."""

    metrics: Mapping[str, float]
    feature_stats: Optional[FeatureStats] = None

    def to_record(self) -> RecordDict:
        # The server reads evaluate replies itself (it never calls a strategy's
        # aggregate_evaluate), so Flower's identical-keys check does not apply to them and
        # "feature-count" is sent only with the statistics.
        content, metrics, keys = RecordDict(), dict(self.metrics), EVALUATE_METRIC_KEYS
        stats = self.feature_stats
        if stats is not None:
            metrics[FEATURE_COUNT], keys = stats.count, keys + (FEATURE_COUNT,)
            content[FEATURE_STATS] = ArrayRecord({FEATURE_MEAN: torch.from_numpy(stats.mean),
                                                  FEATURE_COV: torch.from_numpy(stats.cov)})
        content[METRICS] = metric_record(metrics, keys)
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> "EvaluateRes":
        metrics = metric_values(content, METRICS)
        count = metrics.pop(FEATURE_COUNT, None)
        if FEATURE_STATS not in content.array_records:
            return cls(metrics)
        if count is None:
            raise ProtocolError(f"the reply holds {FEATURE_STATS!r} without the metric {FEATURE_COUNT!r}")
        arrays = array_record(content, FEATURE_STATS).to_torch_state_dict()
        require_keys(arrays, (FEATURE_MEAN, FEATURE_COV), f"ArrayRecord {FEATURE_STATS!r}")
        return cls(metrics, FeatureStats(int(count), arrays[FEATURE_MEAN].double().numpy(),
                                         arrays[FEATURE_COV].double().numpy()))


Reply = Union[TrainRes, Refusal, MissingAutoencoder, Failure, EvaluateRes, QueryRes, SegmentationRes]
_BY_TYPE = {MessageType.TRAIN: TrainRes, MessageType.EVALUATE: EvaluateRes, MessageType.QUERY: QueryRes}


def reply_kind(reply: Union[Message, RecordDict]) -> type:
    """The class of a (non-error) reply, from its record names and the message type; for a bare
    RecordDict the type follows from the metrics (``eval_loss``: evaluate, ``installed``: query)."""
    content = content_of(reply)
    for name, kind in ((FAILURE, Failure), (REFUSAL, Refusal), (MISSING_AUTOENCODER, MissingAutoencoder),
                       (SEGMENTATION, SegmentationRes)):
        if name in content.config_records:
            return kind
    if isinstance(reply, Message):
        if reply.metadata.message_type not in _BY_TYPE:
            raise ProtocolError(f"no reply of message type {reply.metadata.message_type!r} in the protocol")
        return _BY_TYPE[reply.metadata.message_type]
    metrics = reply_metrics(content)
    return EvaluateRes if EVAL_LOSS in metrics else QueryRes if INSTALLED in metrics else TrainRes


def decode_reply(reply: Union[Message, RecordDict]) -> Reply:
    """The typed reply; raises :class:`ProtocolError` for an error reply or a malformed one."""
    return reply_kind(reply).from_record(content_of(reply))


def reply_metrics(reply: Union[Message, RecordDict]) -> dict:
    """The metrics of any reply, as sent ({} when it holds none)."""
    content = content_of(reply)
    return dict(content.metric_records[METRICS]) if METRICS in content.metric_records else {}


def reply_ledger(reply: Union[Message, RecordDict]) -> Optional[str]:
    """The privacy ledger (JSON) a reply carries, or None."""
    content = content_of(reply)
    return str(content[PRIVACY].get(LEDGER, "")) if PRIVACY in content.config_records else None


def replace_update_arrays(reply: Message, arrays: ArrayRecord) -> None:
    """Swap the weights of an update in place (the server aggregates in float32)."""
    reply.content[ARRAYS] = arrays
