"""The QUERY messages: latent diffusion's set-up (install the frozen autoencoder at a site, set
its scale factor) and the site's answer; the kinds include the segmentation query
(:mod:`protocol.segmentation`), which has its own reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Union

import torch
from flwr.app import MetricRecord, RecordDict

from protocol.errors import ProtocolError, array_record, config_record, metric_values, require_keys
from protocol.keys import (ARRAYS, CONFIG, COUNT, INSTALL_AUTOENCODER, INSTALLED, METRICS, QUERY, QUERY_METRIC_KEYS,
                           SET_LATENT_SCALE, SITE_INDEX, TOTAL, TOTAL_SQ, WANT_STATS)
from protocol.round import RoundConfig
from protocol.segmentation import SegmentationQuery
from protocol.weights import arrays_to_state, exact_arrays


@dataclass(frozen=True)
class InstallAutoencoder:
    """Keep this frozen autoencoder (``setup.autoencoder_digest`` names it, and the site checks
    the weights against it); with ``want_stats``, answer with the statistics of the site's
    training latents, from which the server computes the scale factor."""

    KIND: ClassVar[str] = INSTALL_AUTOENCODER
    setup: RoundConfig
    weights: Mapping[str, torch.Tensor]
    want_stats: bool = False

    def to_record(self) -> RecordDict:
        config = self.setup.to_record()
        config[QUERY], config[WANT_STATS] = self.KIND, int(self.want_stats)
        return RecordDict({CONFIG: config, ARRAYS: exact_arrays(self.weights)})

    @classmethod
    def from_record(cls, content: RecordDict) -> "InstallAutoencoder":
        want_stats = bool(int(config_record(content, CONFIG).get(WANT_STATS, 0)))
        return cls(RoundConfig.from_record(content), arrays_to_state(array_record(content, ARRAYS)), want_stats)


@dataclass(frozen=True)
class SetLatentScale:
    """Record ``setup.latent_scale`` for the autoencoder ``setup.autoencoder_digest``, which the
    site already holds (it answers ``installed=0`` when it does not)."""

    KIND: ClassVar[str] = SET_LATENT_SCALE
    setup: RoundConfig

    def to_record(self) -> RecordDict:
        config = self.setup.to_record()
        config[QUERY] = self.KIND
        return RecordDict({CONFIG: config})

    @classmethod
    def from_record(cls, content: RecordDict) -> "SetLatentScale":
        return cls(RoundConfig.from_record(content))


Query = Union[InstallAutoencoder, SetLatentScale, SegmentationQuery]


def decode_query(content: RecordDict) -> Query:
    """The query a QUERY message asks (the ``query`` key of its config names the kind)."""
    record = config_record(content, CONFIG)
    if QUERY not in record:
        raise ProtocolError(f"the query names no kind: its config lacks the key {QUERY!r}")
    kinds = {cls.KIND: cls for cls in (InstallAutoencoder, SetLatentScale, SegmentationQuery)}
    kind = str(record[QUERY])
    if kind not in kinds:
        raise ProtocolError(f"unknown query {kind!r}; expected one of {', '.join(kinds)}")
    return kinds[kind].from_record(content)


@dataclass(frozen=True)
class QueryRes:
    """A site's answer to a query: whether it holds the named autoencoder and, after an install
    with ``want_stats``, the count, sum and sum of squares of its training latents."""

    site_index: int
    installed: bool
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def to_record(self) -> RecordDict:
        return RecordDict({METRICS: MetricRecord({SITE_INDEX: self.site_index, INSTALLED: int(self.installed),
                                                  COUNT: self.count, TOTAL: self.total, TOTAL_SQ: self.total_sq})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "QueryRes":
        m = metric_values(content, METRICS)
        require_keys(m, QUERY_METRIC_KEYS, f"MetricRecord {METRICS!r}")
        return cls(int(m[SITE_INDEX]), bool(int(m[INSTALLED])), int(m[COUNT]), float(m[TOTAL]), float(m[TOTAL_SQ]))
