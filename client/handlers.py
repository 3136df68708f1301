"""Message handlers as plain functions: decode the message, call the site logic, encode the reply.

The server sends, in the train/evaluate ``ConfigRecord``: ``experiment-config`` (the resolved YAML),
``server-round``, ``manifest-path``, ``study-id``, in simulation ``site-state-root`` and, for
FedProx, ``proximal-mu``. Site-specific settings (``data-path``, ``site-name``, ``state-dir``,
``epsilon-budget``, or the simulation's ``partition-id``) come from the node config.

With ``privacy.enabled`` a train reply also carries the ConfigRecord ``privacy`` (the site's ledger
as JSON: accountant history, delta, budget, calibration, per-round epsilon; no data), and a site
whose budget does not cover the round replies with metrics only (``budget_exhausted=1``) and the
ConfigRecord ``refusal`` holding the reason: no update leaves the site.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Optional

import yaml
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.data import SiteData, site_data
from client.local import local_evaluate, local_feature_stats, local_train, non_private_metrics
from client.records import EVALUATE_METRIC_KEYS, TRAIN_METRIC_KEYS, arrays_to_state, metric_record, state_to_arrays
from configs import ExperimentConfig, load_config_dict
from privacy.accounting import PrivacyLedger, poisson_sample_rate
from privacy.site import Calibration, SiteRefusal, check_budget, enrol, open_site_ledger, require_dp

MIRROR_KEY = "privacy-ledger"

log = logging.getLogger(__name__)


def _config(content: RecordDict) -> tuple[ExperimentConfig, ConfigRecord]:
    record = content["config"]
    if "experiment-config" not in record:
        raise ValueError("the server sent no 'experiment-config'; server and client versions differ?")
    return load_config_dict(yaml.safe_load(str(record["experiment-config"]))), record


def site_state_dir(node_config: Mapping, record: ConfigRecord, site: SiteData) -> Path:
    """Where the site keeps its ledger: ``--node-config state-dir=...``; in simulation, the
    server-provided root plus the site name. A deployed site never takes the server's word for it."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    if "partition-id" in node_config and str(record.get("site-state-root", "")):
        return Path(str(record["site-state-root"])) / site.name
    raise ValueError(f"site {site.name}: privacy.enabled=true needs a state directory for the privacy ledger; "
                     "start the SuperNode with --node-config 'state-dir=\"/var/lib/meddiff\" ...'")


def site_budget(cfg: ExperimentConfig, node_config: Mapping, site: SiteData) -> float:
    """The site's epsilon budget: ``--node-config epsilon-budget=...``; the experiment's
    ``privacy.target_epsilon`` only for simulated sites (in a deployment the server cannot set it)."""
    if "epsilon-budget" in node_config:
        budget = float(node_config["epsilon-budget"])
        if not budget > 0:
            raise ValueError(f"site {site.name}: node config epsilon-budget must be > 0, got {budget}")
        return budget
    if "partition-id" in node_config:
        return cfg.privacy.target_epsilon
    raise ValueError(f"site {site.name}: privacy.enabled=true needs the site's own budget: "
                     "--node-config 'epsilon-budget=8.0 ...'")


def prepare_privacy(cfg: ExperimentConfig, site: SiteData, node_config: Mapping, record: ConfigRecord,
                    state: Optional[RecordDict]) -> tuple[PrivacyLedger, Calibration]:
    """Reload the ledger, enrol in the study (once) and check the budget; raises :class:`BudgetExhausted`."""
    mirror = str(state[MIRROR_KEY]["json"]) if state is not None and MIRROR_KEY in state else None
    n = len(site.train)
    ledger = open_site_ledger(site_state_dir(node_config, record, site), site=site.name, num_examples=n,
                              privacy_cfg=cfg.privacy, budget=site_budget(cfg, node_config, site), mirror=mirror)
    _mirror(ledger, state)
    cal = enrol(ledger, study=str(record.get("study-id", "study")), num_examples=n, batch_size=cfg.train.batch_size,
                planned_steps=cfg.federation.num_rounds * cfg.federation.local_steps, privacy_cfg=cfg.privacy)
    _mirror(ledger, state)
    check_budget(ledger, cal, cfg.federation.local_steps, sample_rate=poisson_sample_rate(n, cal.batch_size))
    return ledger, cal


def _mirror(ledger: PrivacyLedger, state: Optional[RecordDict]) -> None:
    if state is not None:
        state[MIRROR_KEY] = ConfigRecord({"json": ledger.to_json()})


def refusal_reply(site: SiteData, exc: SiteRefusal, ledger: Optional[PrivacyLedger]) -> RecordDict:
    """Metrics only (every key; ``budget_exhausted=1`` for a budget refusal) and the reason: no
    weights leave the site."""
    metrics = {"num-examples": len(site.train), "train_loss": math.nan, "steps": 0, "site-index": site.index,
               "seconds": 0.0, **non_private_metrics(), "epsilon": exc.epsilon, "budget_exhausted": int(exc.exhausted)}
    if ledger is not None:
        metrics["delta"] = ledger.delta
    reply = RecordDict({"metrics": metric_record(metrics, TRAIN_METRIC_KEYS),
                        "refusal": ConfigRecord({"reason": exc.reason})})
    if ledger is not None:
        reply["privacy"] = ConfigRecord({"ledger": ledger.to_json()})
    return reply


def handle_train(content: RecordDict, node_config: Mapping, state: Optional[RecordDict] = None) -> RecordDict:
    """Train on the site's data; reply with one ArrayRecord and one MetricRecord (plus the ledger
    under DP), or refuse when the privacy budget does not cover the round."""
    cfg, record = _config(content)
    site = site_data(cfg, node_config, str(record.get("manifest-path", "")))
    ledger = cal = None
    try:
        require_dp("epsilon-budget" in node_config, cfg.privacy.enabled, site.name)
        if cfg.privacy.enabled:
            ledger, cal = prepare_privacy(cfg, site, node_config, record, state)
    except SiteRefusal as exc:
        log.warning("%s", exc.reason)
        return refusal_reply(site, exc, exc.ledger)
    weights, metrics = local_train(
        cfg, arrays_to_state(content["arrays"]), site.train, server_round=int(record["server-round"]),
        site_index=site.index, proximal_mu=float(record.get("proximal-mu", 0.0)), ledger=ledger, calibration=cal,
    )
    log.info("site %s round %s: loss %.4f over %d steps, epsilon %.3f", site.name, record["server-round"],
             metrics["train_loss"], metrics["steps"], metrics["epsilon"])
    reply = RecordDict({"arrays": state_to_arrays(weights, cfg.federation.transport_dtype),
                        "metrics": metric_record(metrics, TRAIN_METRIC_KEYS)})
    if ledger is not None:
        _mirror(ledger, state)
        reply["privacy"] = ConfigRecord({"ledger": ledger.to_json()})
    return reply


def handle_evaluate(content: RecordDict, node_config: Mapping, state: Optional[RecordDict] = None) -> RecordDict:
    """Held-out denoising loss of the received global model on the site's test data; when the
    server asks (``fid-stats``), also the feature statistics of that data (ArrayRecord
    ``feature-stats``: mean and covariance; the count in the metrics)."""
    cfg, record = _config(content)
    site = site_data(cfg, node_config, str(record.get("manifest-path", "")))
    metrics = local_evaluate(cfg, arrays_to_state(content["arrays"]), site.test, site_index=site.index)
    reply = RecordDict()
    if int(record.get("fid-stats", 0)):
        stats = local_feature_stats(cfg, site.test)
        metrics["feature-count"] = stats.count
        reply["feature-stats"] = ArrayRecord({"mean": torch.from_numpy(stats.mean), "cov": torch.from_numpy(stats.cov)})
    reply["metrics"] = metric_record(metrics, EVALUATE_METRIC_KEYS)
    return reply
