"""The federated round loop as a plain function over a Flower ``Grid``.

Each round: configure and send training to sampled sites, screen and aggregate their updates,
update the server-side EMA, evaluate on every site's held-out data, append per-site and global
rows to ``metrics.csv``, draw a sample grid every ``output.sample_every`` rounds, and write a
checkpoint (global and EMA weights, strategy state, round, phase, config, per-site metrics,
per-site privacy ledgers, RNG state). ``resume_from`` continues at the round after the
checkpoint's; with fixed seeds and no DP the result equals an uninterrupted run, since sites seed
their randomness by (seed, round, site) and updates are aggregated in site order (DP noise is
unpredictable on purpose, so DP runs resume correctly but not bit-identically).

Latent diffusion (``autoencoder.enabled``) trains in two phases (Rombach et al. 2022):

1. **autoencoder**: ``autoencoder.num_rounds`` FedAvg rounds of the KL autoencoder, with site
   DP-SGD (``autoencoder.mode: dp``) or explicitly without it (``not_private``); with ``public``
   the server pre-trains it on public data (or loads it) and the sites never train it;
2. **scale and install**: the frozen autoencoder goes to every site *once* (a QUERY message); the
   sites answer with count, sum and sum of squares of their training latents, from which the
   server sets the scale factor ``1 / std`` and sends it (no weights);
3. **diffusion**: ``federation.num_rounds`` rounds of the latent UNet; messages name the
   autoencoder by digest, and a site that lost it (a restarted daemon) is sent it again.

Privacy: a site whose budget does not cover a round refuses it; the server stops sampling it and
ends the run cleanly, saying why, once fewer than ``min_train_nodes`` sites have budget left. The
privacy report (``privacy_report.{json,md,png}``) is written at the end of every DP run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from configs import ExperimentConfig, config_to_dict, config_to_yaml, load_config_dict
from meddiff.build import build_autoencoder, build_unet, codec_from_checkpoint, sample_spacing
from meddiff.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from meddiff.ema import EMA
from meddiff.latent import LatentCodec, LatentStats
from meddiff.outputs import write_samples
from meddiff.runs import MetricsCSV
from meddiff.train import sample_images, seed_everything
from privacy.report import save_central, save_site_ledgers, update_site_ledgers, write_privacy_report
from server.strategy import (
    base_strategy,
    create_strategy,
    is_refusal,
    load_strategy_state,
    refusal_report,
    sampled_sites,
    strategy_state,
)

log = logging.getLogger("meddiff.server")

PRIVACY_FIELDS = ["epsilon", "delta", "noise_multiplier", "sample_rate", "clip_fraction", "budget_exhausted"]
METRIC_FIELDS = ["round", "phase", "scope", "node", "accepted", "reason", "num_examples", "train_loss", "eval_loss", "fid",
                 "steps", "seconds", *PRIVACY_FIELDS]


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Float32 tensors of an aggregated ``ArrayRecord`` (the strategy may return float64)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in record.to_torch_state_dict().items()}


def _numpy(state) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _say(msg: str) -> None:
    log.info(msg)
    print(f"[meddiff] {msg}", flush=True)


@dataclass
class Phase:
    """One federated training phase: what is trained, for how many rounds, how it is saved."""

    name: str                              # "autoencoder" | "diffusion"
    num_rounds: int
    build: Callable[[], nn.Module]
    checkpoint_prefix: str                 # "ae_round" | "round"
    ema_decay: Optional[float]             # server EMA of the global weights (None: none)
    samples: bool                          # draw sample grids (the diffusion phase)


def run_federation(grid: Grid, cfg: ExperimentConfig, *, run_dir: Path, resume_from: str = "",
                   manifest_path: str = "") -> dict:
    """Run the experiment's phases; returns a summary dict (also written to ``summary.json``)."""
    return _Federation(grid, cfg, Path(run_dir), manifest_path).run(resume_from)


class _Federation:
    def __init__(self, grid: Grid, cfg: ExperimentConfig, run_dir: Path, manifest_path: str):
        self.grid, self.cfg, self.run_dir = grid, cfg, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg_yaml = config_to_yaml(cfg)
        (run_dir / "config.yaml").write_text(self.cfg_yaml)
        seed_everything(cfg.train.seed)
        self.ckpt_dir = run_dir / "checkpoints"
        # the sites' privacy state belongs to the study, which a resumed run continues
        self.study = {"study-id": f"{run_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}", "site-state-root": str(run_dir / "site_state")}
        self.manifest_path = manifest_path
        self.history: dict = {"rounds": []}
        self.ledgers: dict = {}
        self.exhausted_sites: set[str] = set()
        self.exhausted_nodes: set[int] = set()
        self.stop_reason = ""
        fed, pc = cfg.federation, cfg.privacy
        self.central = {"mode": pc.central_dp, "noise_multiplier": pc.central_noise_multiplier,
                        "clipping_norm": pc.central_clipping_norm, "sampled_sites": sampled_sites(fed),
                        "num_sites": fed.num_sites, "releases": 0, "clipping_norms": []}
        self.codec: Optional[LatentCodec] = None
        self.autoencoder_transfers = 0  # messages that carried the frozen autoencoder's weights
        self._installed: set[int] = set()  # nodes holding its weights from the scale-statistics query
        self.metrics: Optional[MetricsCSV] = None

    # ------------------------------------------------------------------------------------------
    def run(self, resume_from: str) -> dict:
        cfg = self.cfg
        ckpt = self._restore(resume_from) if resume_from else None
        resumed_phase = ckpt.extra.get("phase", "diffusion") if ckpt else None
        with MetricsCSV(self.run_dir / "metrics.csv", METRIC_FIELDS) as self.metrics:
            if cfg.autoencoder.enabled:
                if resumed_phase == "diffusion":
                    self.codec = codec_from_checkpoint(ckpt, cfg, source=resume_from)
                elif cfg.autoencoder.mode == "public":
                    from meddiff.first_stage import public_codec

                    self.codec = public_codec(cfg, device=torch.device("cpu"), run_dir=self.run_dir, progress=False)
                    _say(f"autoencoder (public, never trained on site data): scale factor {self.codec.scale_factor:.4f}")
                else:
                    state = self._rounds(self._autoencoder_phase(), ckpt if resumed_phase == "autoencoder" else None)
                    if not self.stop_reason:
                        self.codec = self._fit_scale(state)
                if self.codec is not None and not self.stop_reason:
                    self._install(self._live_nodes())
            if not self.stop_reason:
                self._rounds(self._diffusion_phase(), ckpt if resumed_phase == "diffusion" else None)
        return self._finish()

    def _restore(self, resume_from: str) -> Checkpoint:
        ckpt = load_checkpoint(resume_from)
        stored = load_config_dict(ckpt.config)
        if (stored.model, stored.diffusion, stored.autoencoder) != (self.cfg.model, self.cfg.diffusion, self.cfg.autoencoder):
            raise ValueError(f"{resume_from}: its model/diffusion/autoencoder config differs from this run's; resume with the same config")
        x = ckpt.extra
        self.history = json.loads(x.get("history", '{"rounds": []}'))
        if "torch_rng" in x:
            torch.set_rng_state(x["torch_rng"])
        self.study = json.loads(x.get("study", json.dumps(self.study)))
        self.ledgers = json.loads(x.get("privacy_ledgers", "{}"))
        self.exhausted_sites = set(json.loads(x.get("exhausted_sites", "[]")))
        self.central = json.loads(x.get("central_dp", json.dumps(self.central)))
        _say(f"resuming from {resume_from} after {x.get('phase', 'diffusion')} round {ckpt.step} (study {self.study['study-id']})")
        return ckpt

    def _seeded(self, builder: Callable[[ExperimentConfig], nn.Module]) -> Callable[[], nn.Module]:
        """The phase's model, initialised from ``train.seed`` whichever path (fresh, resumed) got here."""
        def build() -> nn.Module:
            torch.manual_seed(self.cfg.train.seed)
            return builder(self.cfg)

        return build

    def _autoencoder_phase(self) -> Phase:
        return Phase("autoencoder", self.cfg.autoencoder.num_rounds, self._seeded(build_autoencoder), "ae_round", None, False)

    def _diffusion_phase(self) -> Phase:
        return Phase("diffusion", self.cfg.federation.num_rounds, self._seeded(build_unet), "round",
                     self.cfg.federation.server_ema_decay, True)

    def _payload(self, phase: str) -> dict:
        payload = {"experiment-config": self.cfg_yaml, "manifest-path": self.manifest_path,
                   "central-dp": self.cfg.privacy.central_dp, "phase": phase, **self.study}
        if phase == "diffusion" and self.codec is not None:
            payload.update({"autoencoder-digest": self.codec.digest, "latent-scale": self.codec.scale_factor})
        return payload

    def _live_nodes(self) -> list[int]:
        return sorted(set(self.grid.get_node_ids()) - self.exhausted_nodes)

    # ------------------------------------------------------------------------------------------
    def _rounds(self, phase: Phase, ckpt: Optional[Checkpoint]) -> dict[str, torch.Tensor]:
        """Run ``phase``'s rounds (from the round after ``ckpt``'s); returns the final global weights."""
        cfg, fed, out = self.cfg, self.cfg.federation, self.cfg.output
        model = phase.build()
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ema = EMA(model, decay=phase.ema_decay) if phase.ema_decay is not None else None
        strategy = create_strategy(fed, cfg.privacy)
        screened = base_strategy(strategy)
        screened.norm_factor = fed.max_update_norm_ratio
        first_round = 1
        if ckpt is not None:
            global_state = ckpt.model
            if ema is not None:
                ema.load_state_dict(ckpt.ema, num_updates=int(ckpt.extra.get("ema_updates", 0)))
            load_strategy_state(screened, ckpt.extra.get("strategy_state", {}))
            first_round = ckpt.step + 1
        model.load_state_dict(global_state)
        payload = self._payload(phase.name)
        sample_model = phase.build() if phase.samples else None
        last = first_round - 1
        if first_round <= phase.num_rounds and phase.name == "autoencoder":
            _say(f"phase 1: autoencoder, {phase.num_rounds} rounds x {cfg.autoencoder.local_steps} local steps "
                 f"({'site DP-SGD' if cfg.autoencoder.mode == 'dp' else 'NOT private'})")
        elif first_round <= phase.num_rounds and cfg.autoencoder.enabled:
            _say(f"phase 2: latent diffusion UNet on {cfg.model.in_channels} x {cfg.model_size}^{cfg.model.spatial_dims} latents, "
                 f"{phase.num_rounds} rounds")
        for rnd in range(first_round, phase.num_rounds + 1):
            t0 = time.perf_counter()
            live = self._live_nodes()
            if self.exhausted_nodes and len(live) < fed.min_train_nodes:
                where = f"{phase.name} round" if cfg.autoencoder.enabled else "round"
                self.stop_reason = (f"stopped before {where} {rnd}: only {len(live)} site(s) have privacy budget "
                                    f"left (or accept this run's privacy settings), fewer than min_train_nodes="
                                    f"{fed.min_train_nodes} (exhausted: {', '.join(sorted(self.exhausted_sites))})")
                _say(self.stop_reason)
                break
            screened.reference = _numpy(global_state)
            messages = strategy.configure_train(rnd, ArrayRecord(global_state), ConfigRecord(payload), self.grid)
            messages = [m for m in messages if m.metadata.dst_node_id not in self.exhausted_nodes]
            replies = list(self.grid.send_and_receive(messages=messages, timeout=fed.round_timeout))
            missing = [r for r in replies if not r.has_error() and "missing-autoencoder" in r.content.config_records]
            replies = [r for r in replies if r not in missing]
            refused = self._collect_privacy(replies)
            new_arrays, _ = strategy.aggregate_train(rnd, [r for r in replies if not is_refusal(r)])
            report = getattr(screened, "round_report", []) + [refusal_report(rnd, r) for r in replies if is_refusal(r)]
            report += [self._missing_report(r) for r in missing]
            if missing:
                self._install([r.metadata.src_node_id for r in missing])
            kept = new_arrays is None
            if not kept and self.central["mode"] != "off":  # one more noisy release of the central mechanism
                self.central["releases"] += 1
                self.central["clipping_norms"].append(float(strategy.clipping_norm))
                save_central(self.run_dir, self.central)
            if not kept:
                global_state = arrays_to_state(new_arrays)
                model.load_state_dict(global_state)
                if ema is not None:
                    ema.update(model)
            accepted = [r for r in report if r["accepted"]]
            for r in report:
                self.metrics.write({"round": rnd, "phase": phase.name, "scope": f"site_{r['site']}", "node": r["node"],
                                    "accepted": int(r["accepted"]), "reason": r["reason"], "num_examples": r.get("num-examples", ""),
                                    "train_loss": r.get("train_loss", ""), "steps": r.get("steps", ""),
                                    "seconds": r.get("seconds", ""), **{k: r.get(k, "") for k in PRIVACY_FIELDS}})
            eval_loss, fid = self._evaluate(phase, rnd, strategy, global_state, ema, sample_model, payload)
            n_train = sum(r.get("num-examples", 0) for r in accepted)
            train_loss = sum(r["train_loss"] * r["num-examples"] for r in accepted) / n_train if n_train else float("nan")
            seconds = time.perf_counter() - t0
            self.metrics.write({"round": rnd, "phase": phase.name, "scope": "global", "accepted": len(accepted),
                                "reason": "kept previous global model" if kept else "", "num_examples": n_train,
                                "train_loss": train_loss, "eval_loss": eval_loss, "fid": fid.get("fid_global", ""),
                                "seconds": seconds})
            max_eps = max((float(r["epsilon"]) for r in accepted if "epsilon" in r), default=float("nan"))
            self.history["rounds"].append({"phase": phase.name, "round": rnd, "accepted": len(accepted),
                                           "rejected": len(report) - len(accepted), "refused": len(refused),
                                           "train_loss": train_loss, "eval_loss": eval_loss, "max_epsilon": max_eps,
                                           "fid": fid.get("fid_global"), "seconds": seconds})
            what = "reconstruction L1" if phase.name == "autoencoder" else "held-out loss"
            _say(f"{'' if not cfg.autoencoder.enabled else phase.name + ' '}round {rnd}/{phase.num_rounds}: "
                 f"{len(accepted)} update(s) aggregated, {len(report) - len(accepted)} rejected ({len(refused)} refused for "
                 f"budget); train loss {train_loss:.4f}, {what} {eval_loss:.4f}"
                 + (f", max site epsilon {max_eps:.3f}" if cfg.privacy.enabled else "") + f" ({seconds:.1f}s)")
            if cfg.privacy.enabled:
                save_site_ledgers(self.run_dir, self.ledgers, exhausted=sorted(self.exhausted_sites))
            if phase.samples and out.sample_every and rnd % out.sample_every == 0 and rnd != phase.num_rounds:
                self._draw(ema, sample_model, f"round_{rnd:04d}")
            self._checkpoint(phase, rnd, global_state, ema, screened, report)
            last = rnd
        if phase.samples:
            self._draw(ema, sample_model, f"round_{last:04d}")
        return global_state

    def _evaluate(self, phase: Phase, rnd: int, strategy, global_state, ema, sample_model, payload) -> tuple[float, dict]:
        """Every site's held-out loss of the new global model (and, every ``evaluation.every``
        rounds of the diffusion phase, the sites' feature statistics for a federated FID)."""
        cfg = self.cfg
        with_fid = phase.samples and bool(cfg.evaluation.every) and rnd % cfg.evaluation.every == 0
        eval_msgs = strategy.configure_evaluate(rnd, ArrayRecord(global_state), ConfigRecord({**payload, "fid-stats": int(with_fid)}),
                                                self.grid)
        rows, site_stats = [], {}
        for reply in self.grid.send_and_receive(messages=eval_msgs, timeout=cfg.federation.round_timeout):
            if reply.has_error() or "metrics" not in reply.content:
                continue
            m = dict(reply.content["metrics"])
            rows.append(m)
            if with_fid and "feature-stats" in reply.content.array_records:
                site_stats[f"site_{int(m['site-index'])}"] = _feature_stats(reply.content["feature-stats"], m)
        fid = self._federated_fid(ema, sample_model, site_stats) if site_stats else {}
        for m in rows:
            scope = f"site_{int(m['site-index'])}"
            self.metrics.write({"round": rnd, "phase": phase.name, "scope": scope, "accepted": "", "num_examples": m["num-examples"],
                                "eval_loss": m["eval_loss"], "fid": fid.get("fid_per_site", {}).get(scope, "")})
        n_eval = sum(m["num-examples"] for m in rows)
        return (sum(m["eval_loss"] * m["num-examples"] for m in rows) / n_eval if n_eval else float("nan")), fid

    def _checkpoint(self, phase: Phase, rnd: int, global_state, ema, screened, report) -> None:
        extra = {"round": rnd, "phase": phase.name, "strategy_state": strategy_state(screened),
                 "site_metrics": json.dumps(report, default=float), "history": json.dumps(self.history),
                 "torch_rng": torch.get_rng_state(), "study": json.dumps(self.study), "privacy_ledgers": json.dumps(self.ledgers),
                 "exhausted_sites": json.dumps(sorted(self.exhausted_sites)), "central_dp": json.dumps(self.central)}
        if ema is not None:
            extra["ema_updates"] = ema.num_updates
        if phase.name == "diffusion" and self.codec is not None:
            extra["autoencoder"] = self.codec.to_payload()
        for name in (f"{phase.checkpoint_prefix}_{rnd:04d}.pt", "last.pt"):
            save_checkpoint(self.ckpt_dir / name, model_state=global_state, ema_state=ema.state_dict() if ema else None,
                            config=config_to_dict(self.cfg), step=rnd, extra=extra)

    def _draw(self, ema: EMA, model, stem: str) -> None:
        ema.copy_to(model)
        samples = sample_images(model, self.cfg, num=self.cfg.output.num_samples, device=torch.device("cpu"),
                                seed=self.cfg.train.seed, progress=False, codec=self.codec)
        write_samples(samples, self.run_dir / "samples", stem, spacing=sample_spacing(self.cfg))

    # ---- latent diffusion set-up ----------------------------------------------------------------
    def _query(self, nodes: list[int], content: RecordDict) -> list[Message]:
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        if "arrays" in content.array_records:
            self.autoencoder_transfers += len(messages)
        replies = list(self.grid.send_and_receive(messages=messages, timeout=self.cfg.federation.round_timeout))
        for r in replies:
            if r.has_error():
                log.warning("node %s could not handle %s: %s", r.metadata.src_node_id,
                            content["config"].get("query"), r.error.reason)
        return [r for r in replies if not r.has_error()]

    def _fit_scale(self, ae_state: dict[str, torch.Tensor]) -> LatentCodec:
        """Send the trained autoencoder to the sites once; set the scale factor from their merged
        latent statistics (or ``autoencoder.scale_factor`` when fixed)."""
        autoencoder = build_autoencoder(self.cfg)
        autoencoder.load_state_dict(ae_state)
        fixed = self.cfg.autoencoder.scale_factor
        codec = LatentCodec(autoencoder, fixed or 1.0)
        content = self._install_content(codec, want_stats=not fixed)
        replies = self._query(self._live_nodes(), content)
        self._installed = {r.metadata.src_node_id for r in replies if int(r.content["metrics"]["installed"])}
        if fixed:
            return codec
        stats = LatentStats()
        for r in replies:
            m = r.content["metrics"]
            stats = stats.merge(LatentStats(int(m["count"]), float(m["total"]), float(m["total-sq"])))
        codec.scale_factor = stats.scale_factor()
        _say(f"latent scale factor {codec.scale_factor:.4f} from {len(replies)} site(s)' latent statistics "
             f"({stats.count} latent elements; no image left a site)")
        return codec

    def _install_content(self, codec: LatentCodec, *, want_stats: bool = False, weights: bool = True) -> RecordDict:
        config = ConfigRecord({**self._payload("diffusion"), "query": "install-autoencoder" if weights else "latent-scale",
                               "autoencoder-digest": codec.digest, "latent-scale": codec.scale_factor, "want-stats": int(want_stats)})
        content = RecordDict({"config": config})
        if weights:
            content["arrays"] = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in codec.autoencoder.state_dict().items()})
        return content

    def _install(self, nodes: list[int]) -> None:
        """Make sure ``nodes`` hold the codec: sites that already received the weights (while the
        scale was estimated) get the scale alone; the others get the weights."""
        have = self._installed
        scale_only = [n for n in nodes if n in have]
        replies = self._query(scale_only, self._install_content(self.codec, weights=False)) if scale_only else []
        lacking = [n for n in nodes if n not in have] + [r.metadata.src_node_id for r in replies
                                                           if not int(r.content["metrics"]["installed"])]
        if lacking:
            self._query(lacking, self._install_content(self.codec))
        self._installed = set()  # from now on a site that lacks it says so, and gets the weights again
        _say(f"autoencoder {self.codec.digest} (scale {self.codec.scale_factor:.4f}) installed at {len(nodes)} site(s); "
             f"weights sent to {len(lacking) + len(have & set(nodes))}")

    def _missing_report(self, msg: Message) -> dict:
        m = dict(msg.content["metrics"]) if "metrics" in msg.content.metric_records else {}
        node = msg.metadata.src_node_id
        log.warning("node %s lacks the autoencoder; sending it again", node)
        return {**m, "node": node, "site": int(m.get("site-index", -1)), "accepted": False,
                "reason": "lacked the phase-1 autoencoder; sent again"}

    # ---- privacy, evaluation, summary ----------------------------------------------------------
    def _collect_privacy(self, replies) -> dict[int, str]:
        """Merge the ledgers carried by DP replies; ``{node_id: site}`` of the sites that refused."""
        found, refused = {}, {}
        for reply in replies:
            if reply.has_error():
                continue
            content, node = reply.content, reply.metadata.src_node_id
            site = f"node {node}"
            if "privacy" in content.config_records:
                text = str(content["privacy"].get("ledger", ""))
                try:
                    site = json.loads(text)["site"]
                    found[site] = text
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("node %s sent an unreadable privacy ledger; ignored", node)
            if "refusal" in content.config_records:
                refused[node] = site
        self.ledgers = update_site_ledgers(self.ledgers, found)
        self.exhausted_nodes |= set(refused)
        self.exhausted_sites |= set(refused.values())
        return refused

    def _federated_fid(self, ema: EMA, model, site_stats: dict) -> dict:
        """FID of EMA samples against the merged site statistics (and per site); no image left a site."""
        from meddiff.evaluate import build_encoder, federated_fid

        ev = self.cfg.evaluation
        ema.copy_to(model)
        samples = sample_images(model, self.cfg, num=ev.num_samples, device=torch.device("cpu"), seed=self.cfg.train.seed + 1,
                                progress=False, codec=self.codec)
        features = build_encoder(ev.encoder, ev.encoder_weights or None).encode(samples)
        result = federated_fid(features, site_stats)
        _say(f"federated FID ({ev.encoder}) {result['fid_global']:.3f}; per site: "
             + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result["fid_per_site"].items())))
        return result

    def _finish(self) -> dict:
        cfg = self.cfg
        diffusion_rounds = [r for r in self.history["rounds"] if r.get("phase", "diffusion") == "diffusion"]
        last_round = diffusion_rounds[-1]["round"] if diffusion_rounds else 0
        summary = {"run_dir": str(self.run_dir), "rounds": self.history["rounds"], "checkpoint": str(self.ckpt_dir / "last.pt"),
                   "samples": str(self.run_dir / "samples" / f"round_{last_round:04d}.png") if diffusion_rounds else None,
                   "stop_reason": self.stop_reason,
                   "private": cfg.privacy.enabled, "latent_diffusion": cfg.autoencoder.enabled}
        if self.codec is not None:
            summary["autoencoder"] = {"mode": cfg.autoencoder.mode, "digest": self.codec.digest,
                                      "scale_factor": self.codec.scale_factor, "weight_transfers": self.autoencoder_transfers}
        if cfg.privacy.enabled:
            save_site_ledgers(self.run_dir, self.ledgers, exhausted=sorted(self.exhausted_sites))
            summary["epsilon"] = {name: led["epsilon"] for name, led in sorted(self.ledgers.items())}
        if self.ledgers or self.central["releases"]:
            summary["privacy_report"] = str(write_privacy_report(self.run_dir)["md"])
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        _write_summary_md(self.run_dir, cfg, summary)
        return summary


def _feature_stats(record: ArrayRecord, metrics: dict):
    from meddiff.evaluate import FeatureStats

    arrays = record.to_torch_state_dict()
    return FeatureStats(int(metrics["feature-count"]), arrays["mean"].double().numpy(), arrays["cov"].double().numpy())


def _write_summary_md(run_dir: Path, cfg: ExperimentConfig, summary: dict) -> None:
    fed, ae = cfg.federation, cfg.autoencoder
    model = "latent diffusion (ADM on autoencoder latents)" if ae.enabled else "ADM"
    lines = [
        "# meddiff-fl federated run", "",
        f"- strategy: `{fed.strategy}`, {fed.num_rounds} rounds x {fed.local_steps} local steps, {fed.num_sites} sites",
        f"- data: `{cfg.data.dataset}` at {cfg.data.image_size}px ({cfg.model.spatial_dims}-D); model: {model}, "
        f"{cfg.model.model_channels} base channels",
    ]
    if ae.enabled:
        first = {"dp": f"federated, {ae.num_rounds} rounds x {ae.local_steps} steps, DP-SGD at every site",
                 "not_private": f"federated, {ae.num_rounds} rounds x {ae.local_steps} steps, **not private**",
                 "public": "pre-trained on public data / loaded; never trained on site data"}[ae.mode]
        scale = summary.get("autoencoder", {}).get("scale_factor")
        lines.append(f"- autoencoder (phase 1): {first}; latent {ae.latent_channels} x {cfg.model_size}^{cfg.model.spatial_dims}"
                     + (f", scale factor {scale:.4f}" if scale else ""))
    lines += [
        f"- config: `{run_dir / 'config.yaml'}`", f"- metrics: `{run_dir / 'metrics.csv'}`",
        f"- final checkpoint: `{summary['checkpoint']}`", f"- final EMA samples: `{summary['samples'] or 'none (no diffusion round ran)'}`",
        "- privacy: " + (f"DP-SGD at every site; report `{summary.get('privacy_report', 'none (no DP site replied)')}`; "
                         f"final epsilon per site: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.get("epsilon", {}).items())
                         if cfg.privacy.enabled else "none (privacy.enabled=false: epsilon is infinite)"),
    ]
    if summary.get("stop_reason"):
        lines.append(f"- **ended early**: {summary['stop_reason']}")
    lines += ["", "| phase | round | accepted | rejected | refused (budget) | train loss | held-out loss | max site epsilon | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["rounds"]:
        lines.append(f"| {r.get('phase', 'diffusion')} | {r['round']} | {r['accepted']} | {r['rejected']} | {r.get('refused', 0)} | "
                     f"{r['train_loss']:.4f} | {r['eval_loss']:.4f} | {r.get('max_epsilon', float('nan')):.3f} | {r['seconds']:.1f} |")
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
