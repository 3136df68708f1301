"""The metric records of replies: what every reply of a kind carries, and how it is encoded."""

from __future__ import annotations

import math
from typing import Mapping, Optional

from flwr.app import MessageType, MetricRecord

from protocol.keys import (BUDGET_EXHAUSTED, CLIP_FRACTION, DELTA, EPSILON, EVAL_LOSS, EVALUATE_METRIC_KEYS, NOISE_MULTIPLIER,
                           NUM_EXAMPLES, PRIVACY_UNIT, PRIVACY_UNITS, QUERY_METRIC_KEYS, RECORDS_PER_PATIENT, SAMPLE_RATE,
                           SECONDS, SITE_INDEX, STEPS, TRAIN_LOSS, TRAIN_METRIC_KEYS, TRANSLATION_METRIC_KEYS)

#: The metric keys of the replies to each kind of message.
METRIC_KEYS_BY_TYPE = {MessageType.TRAIN: TRAIN_METRIC_KEYS, MessageType.EVALUATE: EVALUATE_METRIC_KEYS,
                       MessageType.QUERY: QUERY_METRIC_KEYS}


def metric_record(values: Mapping[str, float], keys: tuple[str, ...]) -> MetricRecord:
    """A ``MetricRecord`` with exactly ``keys`` (a missing key is a programming error)."""
    missing = [k for k in keys if k not in values]
    if missing:
        raise KeyError(f"metrics {missing} missing from the reply")
    return MetricRecord({k: float(values[k]) if isinstance(values[k], float) else values[k] for k in keys})


def privacy_metrics(*, epsilon: float, delta: float, noise_multiplier: float, sample_rate: float, clip_fraction: float,
                    budget_exhausted: int = 0, patient_unit: bool = False, units: int = 0,
                    records_per_patient: int = 0) -> dict[str, float]:
    """The privacy metrics of a train reply: the spending, and what it protects (``patient_unit``:
    one patient rather than one record; ``units``: patients or records at the site; ``records_per_patient``: k)."""
    return {EPSILON: epsilon, DELTA: delta, NOISE_MULTIPLIER: noise_multiplier, SAMPLE_RATE: sample_rate,
            CLIP_FRACTION: clip_fraction, BUDGET_EXHAUSTED: budget_exhausted, PRIVACY_UNIT: int(patient_unit),
            PRIVACY_UNITS: int(units), RECORDS_PER_PATIENT: int(records_per_patient)}


def non_private_metrics() -> dict[str, float]:
    """The privacy keys every reply carries, for a site training without DP (epsilon is infinite)."""
    return privacy_metrics(epsilon=math.inf, delta=0.0, noise_multiplier=0.0, sample_rate=0.0, clip_fraction=0.0)


def train_metrics(*, num_examples: int, train_loss: float, steps: int, site_index: int, seconds: float,
                  privacy: Mapping[str, float]) -> dict[str, float]:
    """The metrics of a train reply (``privacy``: :func:`privacy_metrics`)."""
    return {NUM_EXAMPLES: num_examples, TRAIN_LOSS: train_loss, STEPS: steps, SITE_INDEX: site_index, SECONDS: seconds,
            **privacy}


def evaluate_metrics(*, num_examples: int, eval_loss: float, site_index: int,
                     translation: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """The metrics of an evaluate reply (without feature statistics); ``translation``: the site's
    ``{TRANSLATION_SSIM, TRANSLATION_PSNR, TRANSLATION_MAE}`` (NaN without)."""
    scores = {k: float((translation or {}).get(k, math.nan)) for k in TRANSLATION_METRIC_KEYS}
    return {NUM_EXAMPLES: num_examples, EVAL_LOSS: eval_loss, SITE_INDEX: site_index, **scores}


def failure_metrics(message_type: str, site_index: int) -> dict[str, float]:
    """Every metric key of the replies to ``message_type`` (NaN for losses and seconds, else 0),
    so that a failure keeps the replies' key sets identical."""
    keys = METRIC_KEYS_BY_TYPE[message_type]
    values = {k: 0 for k in keys}
    values.update({k: math.nan for k in (TRAIN_LOSS, EVAL_LOSS, SECONDS, *TRANSLATION_METRIC_KEYS) if k in keys})
    values[SITE_INDEX] = site_index
    return values
