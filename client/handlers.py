"""Message handlers as plain functions: decode the message, call the site logic, encode the reply.

The server sends, in the train/evaluate ``ConfigRecord``: ``experiment-config`` (the resolved YAML),
``server-round``, ``manifest-path`` and, for FedProx, ``proximal-mu``. Site-specific settings
(``data-path``, ``site-name``, or the simulation's ``partition-id``) come from the node config.
"""

from __future__ import annotations

import logging
from typing import Mapping

import yaml
from flwr.app import ConfigRecord, RecordDict

from client.data import site_data
from client.local import local_evaluate, local_train
from client.records import EVALUATE_METRIC_KEYS, TRAIN_METRIC_KEYS, arrays_to_state, metric_record, state_to_arrays
from configs import ExperimentConfig, load_config_dict

log = logging.getLogger(__name__)


def _config(content: RecordDict) -> tuple[ExperimentConfig, ConfigRecord]:
    record = content["config"]
    if "experiment-config" not in record:
        raise ValueError("the server sent no 'experiment-config'; server and client versions differ?")
    return load_config_dict(yaml.safe_load(str(record["experiment-config"]))), record


def handle_train(content: RecordDict, node_config: Mapping) -> RecordDict:
    """Train on the site's data; reply with one ArrayRecord and one MetricRecord."""
    cfg, record = _config(content)
    site = site_data(cfg, node_config, str(record.get("manifest-path", "")))
    state, metrics = local_train(
        cfg, arrays_to_state(content["arrays"]), site.train, server_round=int(record["server-round"]),
        site_index=site.index, proximal_mu=float(record.get("proximal-mu", 0.0)),
    )
    log.info("site %s round %s: loss %.4f over %d steps", site.name, record["server-round"], metrics["train_loss"], metrics["steps"])
    return RecordDict({"arrays": state_to_arrays(state, cfg.federation.transport_dtype),
                       "metrics": metric_record(metrics, TRAIN_METRIC_KEYS)})


def handle_evaluate(content: RecordDict, node_config: Mapping) -> RecordDict:
    """Held-out denoising loss of the received global model on the site's test data."""
    cfg, record = _config(content)
    site = site_data(cfg, node_config, str(record.get("manifest-path", "")))
    metrics = local_evaluate(cfg, arrays_to_state(content["arrays"]), site.test, site_index=site.index)
    return RecordDict({"metrics": metric_record(metrics, EVALUATE_METRIC_KEYS)})
