"""The messages between the meddiff-fl server and its sites (Flower Message API).

This package is the only place where record names and keys are spelled: the server and the
sites build and read messages through the types below, each with ``to_record()`` and
``from_record()``. Every message's content is a ``RecordDict``.

Server to site
--------------
TRAIN and EVALUATE (:class:`RoundIns`), built by the server's Flower strategy:

- ArrayRecord ``arrays``: the global weights of the phase (``state_to_arrays``);
- ConfigRecord ``config`` (:class:`RoundConfig`): ``experiment-config`` (the resolved experiment
  config as YAML), ``phase`` (``diffusion``, or ``autoencoder`` for latent diffusion's first
  stage), ``num-rounds``, ``manifest-path``, ``study-id`` (the sites' privacy enrolment),
  ``site-state-root`` and ``progress-dir`` (simulation only: where simulated sites keep their
  state and write their progress), ``known-ledgers`` (JSON: the server's copy of every DP
  site's ledger, by site name), ``central-dp`` (``off``, ``fixed`` or ``adaptive``); in phase
  2 of latent diffusion ``autoencoder-digest`` and ``latent-scale``; in an evaluate message
  that wants feature statistics for a federated FID, ``fid-stats=1``. Flower adds
  ``server-round``, FedProx ``proximal-mu``, central DP the clipping norm ``clipping_norm``.

QUERY (latent diffusion's set-up, built by the server itself), the same ``config`` plus
``query``, the kind:

- ``install-autoencoder`` (:class:`InstallAutoencoder`): ArrayRecord ``arrays`` holds the frozen
  autoencoder, named by ``autoencoder-digest``; with ``want-stats=1`` the site answers with
  the statistics of its training latents;
- ``latent-scale`` (:class:`SetLatentScale`): record ``latent-scale`` for the autoencoder the
  site already holds.

Site to server
--------------
A reply to TRAIN is one of (:func:`decode_reply` tells them apart by their record names):

- :class:`TrainRes`: exactly one ArrayRecord ``arrays`` (the new weights, fp32 or fp16) and
  one MetricRecord ``metrics`` with the keys ``TRAIN_METRIC_KEYS``, the same from every site;
  under DP also the ConfigRecord ``privacy`` with ``ledger`` (the site's ledger as JSON:
  accountant history, delta, budget, calibration, per-round epsilon; no data);
- :class:`Refusal`: ``metrics`` (``budget_exhausted=1`` when the budget is spent) and the
  ConfigRecord ``refusal`` with ``reason``; under DP the ledger too; no weights;
- :class:`MissingAutoencoder`: ``metrics`` and the ConfigRecord ``missing-autoencoder`` with
  ``digest``, the phase-2 autoencoder the site lacks; the server sends it again;
- :class:`Failure`: handling the message raised at the site: ``metrics`` (every key of the
  reply kind, NaN or 0) and the ConfigRecord ``failure`` with ``reason`` (one line) and
  ``traceback``. Any message can be answered with a failure.

A reply to EVALUATE (:class:`EvaluateRes`): ``metrics`` with ``EVALUATE_METRIC_KEYS`` (the
translation scores ``translation_ssim``/``_psnr``/``_mae`` are NaN unless the phase translates); when
asked for feature statistics also the metric ``feature-count`` and the ArrayRecord
``feature-stats`` with ``mean`` and ``cov``.

A reply to QUERY (:class:`QueryRes`): ``metrics`` with ``QUERY_METRIC_KEYS``: ``site-index``,
``installed`` (0 when the site lacks the named autoencoder), ``count``, ``total``, ``total-sq``.

A mask-conditioned study's per-site segmentation utility is a QUERY too, of kind
``segmentation-utility`` (:class:`SegmentationQuery`): the ``config`` (whose ``server-round`` names
the round) and the ArrayRecord ``arrays`` with the server's EMA weights of the denoiser. The
site answers (:class:`SegmentationRes`) with ``metrics``: ``SEGMENTATION_METRIC_KEYS``
(``site-index``, ``num_real_train``, ``num_synthetic``, ``num_real_test``, ``seconds``) and for
every column of ``SEGMENTATION_COLUMNS`` and region ``dice/<column>/<region>`` (NaN when no image
holds the region) and ``cases/<column>/<region>``; and the ConfigRecord ``segmentation`` with
``regions``, the regions in order. Numbers only: no image or mask leaves the site.

A malformed message raises :class:`ProtocolError`, naming the missing record or key.
"""

from protocol.errors import ProtocolError
from protocol.keys import (EVALUATE_METRIC_KEYS, FEATURE_COUNT, NUM_EXAMPLES, PRIVACY_METRIC_KEYS, QUERY_METRIC_KEYS,
                           SEGMENTATION_COLUMNS, SEGMENTATION_METRIC_KEYS, SITE_INDEX, TRAIN_METRIC_KEYS,
                           TRANSLATION_METRIC_KEYS)
from protocol.metrics import (METRIC_KEYS_BY_TYPE, evaluate_metrics, metric_record, non_private_metrics, privacy_metrics,
                              train_metrics)
from protocol.queries import InstallAutoencoder, Query, QueryRes, SetLatentScale, decode_query
from protocol.segmentation import SegmentationQuery, SegmentationRes
from protocol.replies import (EvaluateRes, Failure, MissingAutoencoder, Refusal, Reply, TrainRes, decode_reply,
                              replace_update_arrays, reply_kind, reply_ledger, reply_metrics)
from protocol.round import RoundConfig, RoundIns, central_dp_mode
from protocol.weights import TRANSPORT_DTYPES, arrays_to_state, exact_arrays, state_to_arrays

__all__ = [
    "EVALUATE_METRIC_KEYS", "FEATURE_COUNT", "METRIC_KEYS_BY_TYPE", "NUM_EXAMPLES", "PRIVACY_METRIC_KEYS",
    "QUERY_METRIC_KEYS", "SEGMENTATION_COLUMNS", "SEGMENTATION_METRIC_KEYS", "SITE_INDEX", "TRAIN_METRIC_KEYS",
    "TRANSLATION_METRIC_KEYS", "TRANSPORT_DTYPES", "EvaluateRes", "Failure", "InstallAutoencoder", "MissingAutoencoder", "ProtocolError", "Query",
    "QueryRes", "Refusal", "Reply", "RoundConfig", "RoundIns", "SegmentationQuery", "SegmentationRes", "SetLatentScale",
    "TrainRes", "arrays_to_state", "central_dp_mode", "decode_query", "decode_reply",
    "evaluate_metrics", "exact_arrays", "metric_record", "non_private_metrics", "privacy_metrics", "replace_update_arrays",
    "reply_kind", "reply_ledger", "reply_metrics", "state_to_arrays", "train_metrics",
]
