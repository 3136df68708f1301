"""Message handlers as plain functions: decode the message, call the site logic, encode the reply.

What the messages hold is specified in :mod:`protocol`. Site-specific settings (``data-path``,
``site-name``, ``state-dir``, ``epsilon-budget``, or the simulation's ``partition-id``) come from
the node config.

With ``privacy.enabled`` a train reply also carries the site's ledger, and a site whose budget
does not cover the round refuses it (:class:`protocol.Refusal`): no update leaves the site.
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import Mapping, Optional, Union

from flwr.app import ConfigRecord, RecordDict
from torch.utils.data import Dataset

from client.data import SiteData, node_site_index, site_data
from client.progress import SiteProgress, progress_path
from client.local import local_evaluate, local_feature_stats, local_train, round_seed
from client.state import install_autoencoder, set_scale, site_codec, site_latents
from meddiff.recipes.build import build_autoencoder
from meddiff.device import resolve_device
from meddiff.latent import latent_stats
from meddiff.recipes.site_segmentation import site_segmentation
from privacy.refusals import SiteRefusal, require_dp
from privacy.site import SitePrivacy, required_state_dir, site_budget, state_dir_of
from protocol import (EvaluateRes, Failure, InstallAutoencoder, MissingAutoencoder, Query, QueryRes, Refusal, RoundConfig,
                      RoundIns, SegmentationQuery, SegmentationRes, TrainRes, decode_query)
from protocol.keys import AUTOENCODER_DIGEST, EPSILON, STEPS, TRAIN_LOSS

MIRROR_KEY = "privacy-ledger"
SEGMENTATION_SEED_SALT = 11  # the site's segmentation evaluation draws from its own seed stream

log = logging.getLogger("meddiff.site")


def open_privacy(round_config: RoundConfig, site: SiteData, node_config: Mapping,
                 state: Optional[RecordDict]) -> SitePrivacy:
    """The site's privacy for this round: its ledger (reconciled with the ClientApp's mirror in
    ``context.state`` and the server's record of this site), enrolled in the study and checked
    against this round of the config's phase; raises :class:`~privacy.refusals.BudgetExhausted`."""
    cfg = round_config.experiment
    known = round_config.known_ledgers.get(site.name)
    privacy = SitePrivacy.open(
        cfg, site=site.name, train_set=site.train, budget=site_budget(cfg, node_config, site.name),
        state_dir=required_state_dir(node_config, round_config.site_state_root, site.name), study=round_config.study_id,
        mirror=str(state[MIRROR_KEY]["json"]) if state is not None and MIRROR_KEY in state else None,
        server_copy=json.dumps(known) if known else None, keep_mirror=lambda text: _mirror(text, state))
    privacy.check(round_config.phase)
    return privacy


def _mirror(text: str, state: Optional[RecordDict]) -> None:
    if state is not None:
        state[MIRROR_KEY] = ConfigRecord({"json": text})


def refusal_reply(site: SiteData, exc: SiteRefusal) -> Refusal:
    """Metrics only (``budget_exhausted=1`` for a budget refusal) and the reason: no weights leave the site."""
    ledger = exc.ledger
    return Refusal.for_site(site_index=site.index, num_examples=len(site.train), reason=exc.reason, epsilon=exc.epsilon,
                            exhausted=exc.exhausted, delta=ledger.delta if ledger is not None else None,
                            ledger=ledger.to_json() if ledger is not None else None)


def _codec_of(round_config: RoundConfig, state: Optional[RecordDict], node_config: Mapping, site: SiteData):
    digest = round_config.autoencoder_digest
    if not digest:
        raise ValueError(f"the server sent a latent-diffusion round without naming its autoencoder ({AUTOENCODER_DIGEST})")
    return site_codec(round_config.experiment, state, digest=digest, scale=round_config.latent_scale,
                      state_dir=state_dir_of(node_config, round_config.site_state_root, site.name))


def round_data(round_config: RoundConfig, state: Optional[RecordDict], node_config: Mapping, site: SiteData,
               split: str) -> Optional[Dataset]:
    """What this round trains or evaluates on: the phase's share of the site's examples of
    ``split`` (:meth:`~meddiff.recipes.phase_base.TrainingPhase.examples`), or in phase 2 of latent
    diffusion their latents (None when the site lacks the autoencoder the server names)."""
    cfg = round_config.experiment
    data = round_config.phase.examples(cfg, site.train if split == "train" else site.test)
    if not round_config.phase.trains_on_latents(cfg):
        return data
    key = tuple(sorted((k, str(v)) for k, v in node_config.items())) + (round_config.manifest_path, split)
    return site_latents(cfg, data, key=key, digest=round_config.autoencoder_digest, scale=round_config.latent_scale,
                        load_codec=lambda: _codec_of(round_config, state, node_config, site))


def missing_autoencoder_reply(site: SiteData, round_config: RoundConfig) -> MissingAutoencoder:
    """Metrics only and the digest the site lacks: the server sends the autoencoder again."""
    return MissingAutoencoder.for_site(site_index=site.index, num_examples=len(site.train),
                                       digest=round_config.autoencoder_digest)


def train_round(ins: RoundIns, node_config: Mapping,
                state: Optional[RecordDict] = None) -> Union[TrainRes, Refusal, MissingAutoencoder]:
    """Train on the site's data in the server's phase: the update (with the ledger under DP), a
    refusal when the privacy budget does not cover the round, or word that the site lacks the
    phase-2 autoencoder."""
    round_config = ins.config
    cfg, phase = round_config.experiment, round_config.phase
    site = site_data(cfg, node_config, round_config.manifest_path)
    private = phase.is_private(cfg)
    privacy = None
    try:
        require_dp("epsilon-budget" in node_config, private, site.name)
        if private:
            privacy = open_privacy(round_config, site, node_config, state)
    except SiteRefusal as exc:
        log.warning("%s", exc.reason)
        return refusal_reply(site, exc)
    train_set = round_data(round_config, state, node_config, site, "train")
    if train_set is None:
        log.warning("site %s does not hold autoencoder %s; asking the server for it", site.name, round_config.autoencoder_digest)
        return missing_autoencoder_reply(site, round_config)
    server_round = round_config.round_number()
    epsilon_probe: list = []
    progress = SiteProgress(site.name, phase.name, server_round, round_config.num_rounds, phase.local_steps(cfg),
                            path=progress_path(node_config, round_config.progress_dir, site.name, phase.name, server_round),
                            epsilon=(lambda: epsilon_probe[0]()) if private else None)
    weights, metrics = local_train(
        cfg, ins.weights(), train_set, server_round=server_round, site_index=site.index,
        proximal_mu=round_config.proximal_mu or 0.0, privacy=privacy, phase=phase,
        on_step=progress, epsilon_probe=epsilon_probe,
    )
    log.info("site %s %s round %s: loss %.4f over %d steps, epsilon %.3f", site.name, phase.name, server_round,
             metrics[TRAIN_LOSS], metrics[STEPS], metrics[EPSILON])
    return TrainRes.from_weights(weights, metrics, transport_dtype=cfg.federation.transport_dtype,
                                 ledger=privacy.ledger.to_json() if privacy is not None else None)


def evaluate_round(ins: RoundIns, node_config: Mapping, state: Optional[RecordDict] = None) -> EvaluateRes:
    """Held-out loss of the received global model on the site's test data (the reconstruction
    error in the autoencoder phase); when the server asks, also the feature statistics of that
    data (mean and covariance)."""
    round_config = ins.config
    cfg, phase = round_config.experiment, round_config.phase
    site = site_data(cfg, node_config, round_config.manifest_path)
    test_set = round_data(round_config, state, node_config, site, "test")
    if test_set is None:
        raise ValueError(f"site {site.name} does not hold autoencoder {round_config.autoencoder_digest}")
    metrics = local_evaluate(cfg, ins.weights(), test_set, site_index=site.index, phase=phase)
    stats = local_feature_stats(cfg, site.test) if round_config.want_feature_stats else None
    return EvaluateRes(metrics, stats)


def segmentation_answer(query: SegmentationQuery, node_config: Mapping) -> SegmentationRes:
    """The segmentation utility of the received denoiser on the site's own training and held-out
    pairs (:func:`~meddiff.recipes.site_segmentation.site_segmentation`), seeded by (seed, round,
    site); the reply holds Dice figures and counts only."""
    setup = query.setup
    cfg = setup.experiment
    site = site_data(cfg, node_config, setup.manifest_path)
    seed = round_seed(cfg.train.seed, setup.round_number(), site.index, SEGMENTATION_SEED_SALT)
    report = site_segmentation(cfg, query.weights, site.train, site.test, seed=seed, device=resolve_device(cfg.train.device))
    log.info("site %s segmentation utility after round %s: %d real, %d synthetic, %d held-out pairs (%.1fs)", site.name,
             setup.round_number(), report["num_real_train"], report["num_synthetic"], report["num_real_test"], report["seconds"])
    return SegmentationRes.from_report(site.index, report)


def answer_query(query: Query, node_config: Mapping,
                 state: Optional[RecordDict] = None) -> Union[QueryRes, SegmentationRes]:
    """Latent diffusion's set-up: keep the frozen autoencoder (digest-checked) and, when asked,
    answer with the count, sum and sum of squares of the site's training latents, from which the
    server computes the scale factor (no images leave the site); or record the federated scale
    factor for the installed autoencoder (``installed=False`` when the site lacks it). A
    segmentation query is answered by :func:`segmentation_answer`."""
    if isinstance(query, SegmentationQuery):
        return segmentation_answer(query, node_config)
    setup = query.setup
    cfg, digest, scale = setup.experiment, setup.autoencoder_digest, setup.latent_scale
    site = site_data(cfg, node_config, setup.manifest_path)
    if not isinstance(query, InstallAutoencoder):
        installed = set_scale(state, digest, scale) or _codec_of(setup, state, node_config, site) is not None
        return QueryRes(site_index=site.index, installed=installed)
    install_autoencoder(state, query.weights, digest=digest, scale=scale,
                        state_dir=state_dir_of(node_config, setup.site_state_root, site.name))
    answer = QueryRes(site_index=site.index, installed=True)
    if query.want_stats:
        autoencoder = build_autoencoder(cfg)
        autoencoder.load_state_dict(query.weights)
        stats = latent_stats(autoencoder, site.train, device=resolve_device(cfg.train.device))
        answer = QueryRes(site.index, True, stats.count, stats.total, stats.total_sq)
    log.info("site %s installed autoencoder %s", site.name, digest)
    return answer


# What the ClientApp calls: decode the message's content, run the site's function, encode its reply.
def handle_train(content: RecordDict, node_config: Mapping, state: Optional[RecordDict] = None) -> RecordDict:
    return train_round(RoundIns.from_record(content), node_config, state).to_record()


def handle_evaluate(content: RecordDict, node_config: Mapping, state: Optional[RecordDict] = None) -> RecordDict:
    return evaluate_round(RoundIns.from_record(content), node_config, state).to_record()


def handle_query(content: RecordDict, node_config: Mapping, state: Optional[RecordDict] = None) -> RecordDict:
    return answer_query(decode_query(content), node_config, state).to_record()


def failure_reply(node_config: Mapping, exc: BaseException, message_type: str) -> Failure:
    """What a site sends when handling a message raised: every metric key of the reply (NaN/0), a
    one-line reason and the traceback (the server keeps it in ``<run>/logs/site_errors.log``); no
    weights. The site logs the traceback too."""
    index = node_site_index(node_config)
    text = "".join(traceback.format_exception(exc))
    log.error("site %s failed: %s", node_config.get("site-name", index), text)
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
    return Failure.for_message(message_type, site_index=index, reason=reason, traceback=text)
