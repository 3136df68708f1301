"""A site's segmentation utility of the global mask-conditioned model: the QUERY that asks for it
and the site's answer, Dice figures only (no image or mask leaves the site)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from protocol.errors import ProtocolError, array_record, config_record, metric_values, require_keys
from protocol.keys import (ARRAYS, CASES, CONFIG, DICE, METRICS, NUM_REAL_TEST, NUM_REAL_TRAIN, NUM_SYNTHETIC, QUERY,
                           REGIONS, SECONDS, SEGMENTATION, SEGMENTATION_COLUMNS, SEGMENTATION_METRIC_KEYS,
                           SEGMENTATION_UTILITY, SITE_INDEX)
from protocol.round import RoundConfig
from protocol.weights import arrays_to_state, exact_arrays


@dataclass(frozen=True)
class SegmentationQuery:
    """Score the denoiser with ``weights`` (the server's EMA weights of ``setup.phase``) by
    segmentation utility on the site's own data; ``setup.server_round`` names the round and
    seeds the site's generation and segmenters."""

    KIND: ClassVar[str] = SEGMENTATION_UTILITY
    setup: RoundConfig
    weights: Mapping[str, torch.Tensor]

    def to_record(self) -> RecordDict:
        config = self.setup.to_record()
        config[QUERY] = self.KIND
        return RecordDict({CONFIG: config, ARRAYS: exact_arrays(self.weights)})

    @classmethod
    def from_record(cls, content: RecordDict) -> "SegmentationQuery":
        return cls(RoundConfig.from_record(content), arrays_to_state(array_record(content, ARRAYS)))


def _key(what: str, column: str, region: str) -> str:
    return f"{what}/{column}/{region}"


@dataclass(frozen=True)
class SegmentationRes:
    """A site's segmentation report: ``scores[column][region] = {"dice": float or None, "cases": int}``
    for the columns :data:`~protocol.keys.SEGMENTATION_COLUMNS` (Dice is None when no held-out
    image, or for mask fidelity no generated one, holds the region), and the pair counts."""

    site_index: int
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]]
    num_real_train: int = 0
    num_synthetic: int = 0
    num_real_test: int = 0
    seconds: float = 0.0

    @classmethod
    def from_report(cls, site_index: int, report: Mapping[str, Any]) -> "SegmentationRes":
        """From :func:`meddiff.evaluate.segmentation.segmentation_utility`'s report (plus ``seconds``)."""
        columns = {**report["arms"], "mask_fidelity": report["mask_fidelity"]}
        scores = {c: {r: {"dice": s["dice"], "cases": int(s["cases"])} for r, s in columns[c].items()}
                  for c in SEGMENTATION_COLUMNS}
        return cls(site_index, scores, int(report["num_real_train"]), int(report["num_synthetic"]),
                   int(report["num_real_test"]), float(report.get("seconds", 0.0)))

    @property
    def regions(self) -> list[str]:
        return list(self.scores[SEGMENTATION_COLUMNS[0]])

    def dice(self, column: str, region: str) -> Optional[float]:
        return self.scores[column][region]["dice"]

    def to_record(self) -> RecordDict:
        values: dict[str, float | int] = {SITE_INDEX: self.site_index, NUM_REAL_TRAIN: self.num_real_train,
                                          NUM_SYNTHETIC: self.num_synthetic, NUM_REAL_TEST: self.num_real_test,
                                          SECONDS: float(self.seconds)}
        for column in SEGMENTATION_COLUMNS:
            for region, score in self.scores[column].items():
                values[_key(DICE, column, region)] = math.nan if score["dice"] is None else float(score["dice"])
                values[_key(CASES, column, region)] = int(score["cases"])
        return RecordDict({METRICS: MetricRecord(values), SEGMENTATION: ConfigRecord({REGIONS: self.regions})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "SegmentationRes":
        m = metric_values(content, METRICS)
        regions = [str(r) for r in config_record(content, SEGMENTATION).get(REGIONS, [])]
        if not regions:
            raise ProtocolError(f"the segmentation reply names no {REGIONS!r}")
        keys = [_key(what, c, r) for c in SEGMENTATION_COLUMNS for r in regions for what in (DICE, CASES)]
        require_keys(m, SEGMENTATION_METRIC_KEYS + tuple(keys), f"MetricRecord {METRICS!r}")

        def score(column: str, region: str) -> dict:
            dice = float(m[_key(DICE, column, region)])
            return {"dice": None if math.isnan(dice) else dice, "cases": int(m[_key(CASES, column, region)])}

        return cls(int(m[SITE_INDEX]), {c: {r: score(c, r) for r in regions} for c in SEGMENTATION_COLUMNS},
                   int(m[NUM_REAL_TRAIN]), int(m[NUM_SYNTHETIC]), int(m[NUM_REAL_TEST]), float(m[SECONDS]))
