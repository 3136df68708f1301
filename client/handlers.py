"""Message handlers as plain functions: decode the message, call the site logic, encode the reply.

The server sends, in the train/evaluate ``ConfigRecord``: ``experiment-config`` (the resolved YAML),
``server-round``, ``manifest-path``, ``study-id``, ``phase`` (``diffusion``, or ``autoencoder`` for
latent diffusion's first stage), in simulation ``site-state-root``, for FedProx ``proximal-mu``
and, in phase 2 of latent diffusion, ``autoencoder-digest`` and ``latent-scale`` (the frozen
autoencoder itself arrives once, in a QUERY message: :func:`handle_query`). Site-specific settings (``data-path``, ``site-name``, ``state-dir``,
``epsilon-budget``, or the simulation's ``partition-id``) come from the node config.

With ``privacy.enabled`` a train reply also carries the ConfigRecord ``privacy`` (the site's ledger
as JSON: accountant history, delta, budget, calibration, per-round epsilon; no data), and a site
whose budget does not cover the round replies with metrics only (``budget_exhausted=1``) and the
ConfigRecord ``refusal`` holding the reason: no update leaves the site.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from pathlib import Path
from typing import Mapping, Optional

import yaml
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch.utils.data import Dataset

from client.data import SiteData, site_data
from client.progress import SiteProgress, progress_path
from client.local import local_evaluate, local_feature_stats, local_train, non_private_metrics
from client.state import install_autoencoder, set_scale, site_codec, site_latents
from client.records import EVALUATE_METRIC_KEYS, TRAIN_METRIC_KEYS, arrays_to_state, metric_record, state_to_arrays
from configs import ExperimentConfig, load_config_dict
from privacy.accounting import PrivacyLedger, poisson_sample_rate
from meddiff.build import build_autoencoder
from meddiff.device import resolve_device
from meddiff.latent import latent_stats
from meddiff.recipes.phases import DIFFUSION, TrainingPhase, phase_named, private_plan
from privacy.calibration import Calibration, check_budget, enrol
from privacy.refusals import SiteRefusal, require_dp
from privacy.site import open_site_ledger

MIRROR_KEY = "privacy-ledger"

log = logging.getLogger("meddiff.site")


def _config(content: RecordDict) -> tuple[ExperimentConfig, ConfigRecord]:
    record = content["config"]
    if "experiment-config" not in record:
        raise ValueError("the server sent no 'experiment-config'; server and client versions differ?")
    return load_config_dict(yaml.safe_load(str(record["experiment-config"]))), record


def site_state_dir(node_config: Mapping, record: ConfigRecord, site: SiteData) -> Path:
    """Where the site keeps its ledger: ``--node-config state-dir=...``; in simulation, the
    server-provided root plus the site name. A deployed site never takes the server's word for it."""
    found = optional_state_dir(node_config, record, site)
    if found is None:
        raise ValueError(f"site {site.name}: privacy.enabled=true needs a state directory for the privacy ledger; "
                         "start the SuperNode with --node-config 'state-dir=\"/var/lib/meddiff\" ...'")
    return found


def optional_state_dir(node_config: Mapping, record: ConfigRecord, site: SiteData) -> Optional[Path]:
    """The site's state directory, or None when it has none (a deployed site without DP)."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    if "partition-id" in node_config and str(record.get("site-state-root", "")):
        return Path(str(record["site-state-root"])) / site.name
    return None


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
                    state: Optional[RecordDict], phase: TrainingPhase = DIFFUSION) -> tuple[PrivacyLedger, Calibration]:
    """Reload the ledger, enrol in the study (once, for all of its DP phases) and check the budget
    for this round of ``phase``; raises :class:`BudgetExhausted`."""
    mirror = str(state[MIRROR_KEY]["json"]) if state is not None and MIRROR_KEY in state else None
    n = len(site.train)
    known = json.loads(str(record.get("known-ledgers", "{}")) or "{}").get(site.name)
    ledger = open_site_ledger(site_state_dir(node_config, record, site), site=site.name, num_examples=n,
                              privacy_cfg=cfg.privacy, budget=site_budget(cfg, node_config, site), mirror=mirror,
                              server_copy=json.dumps(known) if known else None)
    _mirror(ledger, state)
    cal = enrol(ledger, study=str(record.get("study-id", "study")), num_examples=n, plan=private_plan(cfg),
                privacy_cfg=cfg.privacy)
    _mirror(ledger, state)
    check_budget(ledger, cal, phase.local_steps(cfg), sample_rate=poisson_sample_rate(n, cal.phase(phase.name)["batch_size"]))
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


def _phase(record: ConfigRecord) -> TrainingPhase:
    return phase_named(str(record.get("phase", "")))


def _codec_of(cfg: ExperimentConfig, record: ConfigRecord, state: Optional[RecordDict], node_config: Mapping, site: SiteData):
    digest = str(record.get("autoencoder-digest", ""))
    if not digest:
        raise ValueError("the server sent a latent-diffusion round without naming its autoencoder (autoencoder-digest)")
    return site_codec(cfg, state, digest=digest, scale=float(record["latent-scale"]),
                      state_dir=optional_state_dir(node_config, record, site))


def round_data(cfg: ExperimentConfig, record: ConfigRecord, state: Optional[RecordDict], node_config: Mapping,
               site: SiteData, split: str) -> Optional[Dataset]:
    """What this round trains or evaluates on: the site's images of ``split``, or in phase 2 of
    latent diffusion their latents (None when the site lacks the autoencoder the server names)."""
    data = site.train if split == "train" else site.test
    if not _phase(record).trains_on_latents(cfg):
        return data
    key = tuple(sorted((k, str(v)) for k, v in node_config.items())) + (str(record.get("manifest-path", "")), split)
    return site_latents(cfg, data, key=key, digest=str(record.get("autoencoder-digest", "")),
                        scale=float(record.get("latent-scale", 0.0)),
                        load_codec=lambda: _codec_of(cfg, record, state, node_config, site))


def missing_autoencoder_reply(site: SiteData, record: ConfigRecord) -> RecordDict:
    """Metrics only and the digest the site lacks: the server sends the autoencoder again."""
    metrics = {"num-examples": len(site.train), "train_loss": math.nan, "steps": 0, "site-index": site.index,
               "seconds": 0.0, **non_private_metrics()}
    return RecordDict({"metrics": metric_record(metrics, TRAIN_METRIC_KEYS),
                       "missing-autoencoder": ConfigRecord({"digest": str(record.get("autoencoder-digest", ""))})})


def handle_train(content: RecordDict, node_config: Mapping, state: Optional[RecordDict] = None) -> RecordDict:
    """Train on the site's data in the server's ``phase``; reply with one ArrayRecord and one
    MetricRecord (plus the ledger under DP), or refuse when the privacy budget does not cover the
    round, or say that the site lacks the phase-2 autoencoder."""
    cfg, record = _config(content)
    phase = _phase(record)
    site = site_data(cfg, node_config, str(record.get("manifest-path", "")))
    private = phase.is_private(cfg)
    ledger = cal = None
    try:
        require_dp("epsilon-budget" in node_config, private, site.name)
        if private:
            ledger, cal = prepare_privacy(cfg, site, node_config, record, state, phase)
    except SiteRefusal as exc:
        log.warning("%s", exc.reason)
        return refusal_reply(site, exc, exc.ledger)
    train_set = round_data(cfg, record, state, node_config, site, "train")
    if train_set is None:
        log.warning("site %s does not hold autoencoder %s; asking the server for it", site.name, record.get("autoencoder-digest"))
        return missing_autoencoder_reply(site, record)
    server_round = int(record["server-round"])
    epsilon_probe: list = []
    progress = SiteProgress(site.name, phase.name, server_round, int(record.get("num-rounds", 0)), phase.local_steps(cfg),
                            path=progress_path(node_config, record, site.name),
                            epsilon=(lambda: epsilon_probe[0]()) if private else None)
    weights, metrics = local_train(
        cfg, arrays_to_state(content["arrays"]), train_set, server_round=server_round, site_index=site.index,
        proximal_mu=float(record.get("proximal-mu", 0.0)), ledger=ledger, calibration=cal, phase=phase,
        on_step=progress, epsilon_probe=epsilon_probe,
    )
    log.info("site %s %s round %s: loss %.4f over %d steps, epsilon %.3f", site.name, phase.name, record["server-round"],
             metrics["train_loss"], metrics["steps"], metrics["epsilon"])
    reply = RecordDict({"arrays": state_to_arrays(weights, cfg.federation.transport_dtype),
                        "metrics": metric_record(metrics, TRAIN_METRIC_KEYS)})
    if ledger is not None:
        _mirror(ledger, state)
        reply["privacy"] = ConfigRecord({"ledger": ledger.to_json()})
    return reply


def handle_evaluate(content: RecordDict, node_config: Mapping, state: Optional[RecordDict] = None) -> RecordDict:
    """Held-out loss of the received global model on the site's test data (the reconstruction
    error in the autoencoder phase); when the server asks (``fid-stats``), also the feature
    statistics of that data (ArrayRecord ``feature-stats``: mean and covariance; the count in the
    metrics)."""
    cfg, record = _config(content)
    phase = _phase(record)
    site = site_data(cfg, node_config, str(record.get("manifest-path", "")))
    test_set = round_data(cfg, record, state, node_config, site, "test")
    if test_set is None:
        raise ValueError(f"site {site.name} does not hold autoencoder {record.get('autoencoder-digest')}")
    metrics = local_evaluate(cfg, arrays_to_state(content["arrays"]), test_set, site_index=site.index, phase=phase)
    reply = RecordDict()
    if int(record.get("fid-stats", 0)):
        stats = local_feature_stats(cfg, site.test)
        metrics["feature-count"] = stats.count
        reply["feature-stats"] = ArrayRecord({"mean": torch.from_numpy(stats.mean), "cov": torch.from_numpy(stats.cov)})
    reply["metrics"] = metric_record(metrics, EVALUATE_METRIC_KEYS)
    return reply


def handle_query(content: RecordDict, node_config: Mapping, state: Optional[RecordDict] = None) -> RecordDict:
    """Latent diffusion's set-up messages (``query`` in the ConfigRecord):

    - ``install-autoencoder``: keep the frozen autoencoder sent in ``arrays`` (digest-checked);
      with ``want-stats``, reply with the count, sum and sum of squares of the site's training
      latents, from which the server computes the scale factor (no images leave the site);
    - ``latent-scale``: record the federated scale factor for the installed autoencoder.

    Replies hold one MetricRecord: ``site-index``, ``installed`` (0 when the site lacks the named
    autoencoder), ``count``, ``total``, ``total-sq``.
    """
    cfg, record = _config(content)
    kind = str(record.get("query", ""))
    site = site_data(cfg, node_config, str(record.get("manifest-path", "")))
    digest, scale = str(record.get("autoencoder-digest", "")), float(record.get("latent-scale", 0.0))
    metrics = {"site-index": site.index, "installed": 1, "count": 0, "total": 0.0, "total-sq": 0.0}
    if kind == "install-autoencoder":
        weights = arrays_to_state(content["arrays"])
        install_autoencoder(state, weights, digest=digest, scale=scale, state_dir=optional_state_dir(node_config, record, site))
        if int(record.get("want-stats", 0)):
            autoencoder = build_autoencoder(cfg)
            autoencoder.load_state_dict(weights)
            stats = latent_stats(autoencoder, site.train, device=resolve_device(cfg.train.device))
            metrics.update({"count": stats.count, "total": stats.total, "total-sq": stats.total_sq})
        log.info("site %s installed autoencoder %s", site.name, digest)
    elif kind == "latent-scale":
        installed = set_scale(state, digest, scale) or _codec_of(cfg, record, state, node_config, site) is not None
        metrics["installed"] = int(installed)
    else:
        raise ValueError(f"unknown query {kind!r}; expected install-autoencoder or latent-scale")
    return RecordDict({"metrics": MetricRecord(metrics)})


def failure_reply(node_config: Mapping, exc: BaseException, keys: tuple[str, ...]) -> RecordDict:
    """What a site sends when handling a message raised: every metric key (NaN/0), a one-line
    reason and the traceback (the server keeps it in ``<run>/logs/site_errors.log``); no weights.
    The site logs the traceback too."""
    index = int(node_config.get("partition-id", node_config.get("site-index", -1)))
    text = "".join(traceback.format_exception(exc))
    log.error("site %s failed: %s", node_config.get("site-name", index), text)
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
    values = {k: 0 for k in keys}
    values.update({k: math.nan for k in ("train_loss", "eval_loss", "seconds") if k in keys})
    values["site-index"] = index
    return RecordDict({"metrics": metric_record(values, keys),
                       "failure": ConfigRecord({"reason": reason, "traceback": text})})
