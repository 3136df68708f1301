"""The federated round loop as a plain function over a Flower ``Grid``.

For each phase, for each round: sample the sites, send them the global weights, sort and screen
their replies, aggregate the valid updates, evaluate on every site's held-out data, write the
round's record (``metrics.csv``, TensorBoard, a sample grid every ``output.sample_every`` rounds)
and a checkpoint (global and EMA weights, strategy state, round, phase, config, per-site metrics,
per-site privacy ledgers, RNG state). ``resume_from`` continues at the round after the
checkpoint's; with fixed seeds and no DP the result equals an uninterrupted run, since sites seed
their randomness by (seed, round, site) and updates are aggregated in site order (DP noise is
unpredictable on purpose, so DP runs resume correctly but not bit-identically).

In a mask-conditioned study with ``evaluation.segmentation_steps`` > 0, every site also scores
the EMA model by segmentation utility on its own data after the last round
(:mod:`server.site_segmentation`).

Latent diffusion (``autoencoder.enabled``) trains in two phases (Rombach et al. 2022): the KL
autoencoder (federated with or without DP, or public), then the latent UNet; in between the
frozen autoencoder is installed at every site once (:mod:`server.latent_setup`).

A run ends early when the sites' privacy budgets leave fewer than ``min_train_nodes`` sites
(status ``stopped``), or after ``federation.max_failed_rounds`` consecutive rounds without
enough valid updates (status ``failed``, so that ``meddiff simulate`` exits non-zero).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from torch import nn

from configs import ExperimentConfig, config_to_yaml, load_config_dict
from configs.compare import resume_conflicts
from meddiff.checkpoint import Checkpoint, load_checkpoint
from meddiff.ema import EMA
from meddiff.latent import LatentCodec
from meddiff.recipes.first_stage import public_codec
from meddiff.recipes.initial import load_initial_weights, start_from
from meddiff.recipes.phases import TrainingPhase, denoiser_phase, phase_named, study_phases
from meddiff.recipes.restore import codec_from_checkpoint
from meddiff.train import seed_everything
from privacy.report import save_central, save_site_ledgers
from protocol import NUM_EXAMPLES, SITE_INDEX, TRANSLATION_METRIC_KEYS, RoundConfig, arrays_to_state
from server.evaluation import Evaluation, weighted_mean
from server.latent_setup import LatentSetup
from server.phase import PhaseRun
from server.replies import learn_node_sites, round_counts, round_report, sort_replies, wait_for_nodes
from server.run_state import RunState, record_config, save_round_checkpoint
from server.screening import aggregate, screen
from server.site_segmentation import SiteSegmentation
from server.strategy import base_strategy, create_strategy, load_strategy_state, sites_per_round
from server.summary import (RunRecord, build_summary, round_line, say, supersede_rows_after, translation_scores,
                            write_summary)

log = logging.getLogger("meddiff.server")


def run_federation(grid: Grid, cfg: ExperimentConfig, *, run_dir: Path, resume_from: str = "",
                   manifest_path: str = "") -> dict:
    """Run the experiment's phases; returns a summary dict (also written to ``summary.json``)."""
    return _Federation(grid, cfg, Path(run_dir), manifest_path).run(resume_from)


class _Federation:
    def __init__(self, grid: Grid, cfg: ExperimentConfig, run_dir: Path, manifest_path: str):
        self.grid, self.cfg, self.run_dir, self.manifest_path = grid, cfg, run_dir, manifest_path
        run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg_yaml = config_to_yaml(cfg)
        seed_everything(cfg.train.seed)
        self.ckpt_dir = run_dir / "checkpoints"
        fed, pc = cfg.federation, cfg.privacy
        self.state = RunState.new(run_dir, {"mode": pc.central_dp, "noise_multiplier": pc.central_noise_multiplier,
                                            "clipping_norm": pc.central_clipping_norm, "sites_per_round": sites_per_round(fed),
                                            "num_sites": fed.num_sites, "releases": 0, "clipping_norms": []})
        self.stop_reason, self.failed = "", False
        self.codec: Optional[LatentCodec] = None
        self.evaluation = Evaluation(grid, cfg, run_dir, say)
        self.segmentation = SiteSegmentation(grid, cfg, run_dir, say)
        self.latent = LatentSetup(grid, cfg, lambda: self._round_config(denoiser_phase(cfg)), say)
        self.record: Optional[RunRecord] = None
        self.initial = load_initial_weights(cfg)  # train.init_from: weights that start each phase's round 1

    def run(self, resume_from: str) -> dict:
        ckpt = self._restore(resume_from) if resume_from else None
        record_config(self.run_dir, self.cfg_yaml, ckpt)
        if self.initial is not None:
            self.initial.write_record(self.run_dir)
        resumed = phase_named(ckpt.extra.get("phase")) if ckpt else None
        with RunRecord(self.run_dir, self.cfg) as self.record:
            for phase in study_phases(self.cfg):
                if resumed is not None and phase.order < resumed.order:
                    continue  # finished before the checkpoint was written
                here = ckpt if phase is resumed else None
                if phase.trains_on_latents(self.cfg):
                    self._install_codec(here, resume_from)
                state = self._rounds(phase, here)
                if self.stop_reason:
                    break
                if phase.produces_codec:
                    self.codec = self.latent.fit_scale(state, self._live_nodes())
        return self._finish()

    def _install_codec(self, ckpt: Optional[Checkpoint], resume_from: str) -> None:
        """Before a phase that trains on latents: the frozen encoder (trained in an earlier phase,
        carried by the checkpoint resumed from, or public), installed at every live site."""
        if ckpt is not None:
            self.codec = codec_from_checkpoint(ckpt, self.cfg, source=resume_from)
        elif self.codec is None:
            self.codec = public_codec(self.cfg, device=torch.device("cpu"), run_dir=self.run_dir, progress=False)
            say(f"autoencoder (public, never trained on site data): scale factor {self.codec.scale_factor:.4f}")
        self.evaluation.codec = self.codec
        self.latent.install(self.codec, self._live_nodes())

    def _restore(self, resume_from: str) -> Checkpoint:
        ckpt = load_checkpoint(resume_from)
        conflicts = resume_conflicts(load_config_dict(ckpt.config), self.cfg)
        if conflicts:
            raise ValueError(f"{resume_from}: this run's config differs from the checkpoint's in what a resume may not "
                             f"change: {'; '.join(conflicts)}")
        if "torch_rng" in ckpt.extra:
            torch.set_rng_state(ckpt.extra["torch_rng"])
        self.state = RunState.from_checkpoint(ckpt.extra, self.state.central)
        phase = phase_named(ckpt.extra.get("phase"))
        moved = supersede_rows_after(self.run_dir / "metrics.csv", phase, ckpt.step)
        say(f"resuming from {resume_from} after {phase.name} round {ckpt.step} (study "
            f"{self.state.study_id})" + (f"; {moved} later metric row(s) moved to metrics_superseded.csv" if moved else ""))
        return ckpt

    def _build(self, phase: TrainingPhase) -> nn.Module:
        """The phase's model, initialised from ``train.seed`` whichever path (fresh, resumed) got here."""
        torch.manual_seed(self.cfg.train.seed)
        return phase.build_model(self.cfg)

    def _round_config(self, phase: TrainingPhase, num_rounds: int = 0) -> RoundConfig:
        """What every message of ``phase`` tells the sites (Flower adds the round)."""
        latent = phase.trains_on_latents(self.cfg) and self.codec is not None
        return RoundConfig(self.cfg, phase=phase, num_rounds=num_rounds, manifest_path=self.manifest_path,
                           study_id=self.state.study_id, site_state_root=str(self.run_dir / "site_state"),
                           progress_dir=str(self.run_dir / "progress"), known_ledgers=self.state.ledgers,
                           central_dp=self.cfg.privacy.central_dp, autoencoder_digest=self.codec.digest if latent else "",
                           latent_scale=self.codec.scale_factor if latent else 0.0)

    def _live_nodes(self) -> list[int]:
        return sorted(set(self.grid.get_node_ids()) - self.state.refused_nodes)

    def _start_phase(self, phase: TrainingPhase, ckpt: Optional[Checkpoint]) -> tuple[PhaseRun, int]:
        fed, decay = self.cfg.federation, phase.server_ema_decay(self.cfg)
        model = self._build(phase)
        if ckpt is None and start_from(model, phase, self.initial):
            say(f"{phase.name}: initial weights from {self.initial.path} (sha256 {self.initial.sha256[:16]})")
        ema = EMA(model, decay=decay) if decay is not None else None
        strategy = create_strategy(fed, self.cfg.privacy)
        global_state, first_round = {k: v.detach().clone() for k, v in model.state_dict().items()}, 1
        if ckpt is not None:
            global_state, first_round = ckpt.model, ckpt.step + 1
            if ema is not None:
                ema.load_state_dict(ckpt.ema, num_updates=int(ckpt.extra.get("ema_updates", 0)))
            load_strategy_state(base_strategy(strategy), ckpt.extra.get("strategy_state", {}))
        model.load_state_dict(global_state)
        run = PhaseRun(phase, model, ema, strategy, global_state, self._build(phase) if phase.draws_samples else None)
        if first_round <= phase.num_rounds(self.cfg):
            say(phase.banner(self.cfg) + run.trainable_note())
        return run, first_round

    def _rounds(self, phase: TrainingPhase, ckpt: Optional[Checkpoint]) -> dict[str, torch.Tensor]:
        """Run ``phase``'s rounds (from the round after ``ckpt``'s); returns the final global weights."""
        run, first_round = self._start_phase(phase, ckpt)
        last, out, num_rounds = first_round - 1, self.cfg.output, phase.num_rounds(self.cfg)
        for rnd in range(first_round, num_rounds + 1):
            if not self._round(run, rnd):
                break
            if phase.draws_samples and out.sample_every and rnd % out.sample_every == 0 and rnd != num_rounds:
                self._draw(run, rnd)
            self._segment(run, rnd, last=False)
            last = rnd
        if phase.draws_samples:
            self._draw(run, last)
        self._segment(run, last, last=True)
        return run.global_state

    def _draw(self, run: PhaseRun, rnd: int) -> None:
        samples = self.evaluation.draw(run.ema, run.sample_model, f"round_{rnd:04d}")
        self.record.board.images("samples/grid", samples, rnd)

    def _segment(self, run: PhaseRun, rnd: int, *, last: bool) -> None:
        """Every live site's segmentation utility of the EMA model on its own data, when due."""
        if self.segmentation.due(run.phase, rnd, last=last):
            entry = self.segmentation.evaluate(run, rnd, self._round_config(run.phase, run.phase.num_rounds(self.cfg)),
                                               self._live_nodes())
            self.record.segmentation(entry)
            self.state.segmentation.append(entry)

    def _round(self, run: PhaseRun, rnd: int) -> bool:
        """One round; False when the run must stop (the reason is in ``stop_reason``)."""
        fed, phase, t0 = self.cfg.federation, run.phase, time.perf_counter()
        live = self._live_nodes()
        if self.state.refused_nodes and len(live) < fed.min_train_nodes:
            self.stop_reason = (f"stopped before {phase.round_name(self.cfg)} {rnd}: "
                                f"only {len(live)} site(s) have privacy budget left (or accept this run's privacy settings), "
                                f"fewer than min_train_nodes={fed.min_train_nodes} (refused: "
                                f"{', '.join(sorted(self.state.refused_sites))})")
            say(self.stop_reason)
            return False
        if not self._enough_nodes(rnd):
            return False
        round_config = self._round_config(phase, phase.num_rounds(self.cfg))
        report, counts = self._train(run, rnd, round_config)
        kept = counts.pop("kept")
        self.record.sites(rnd, phase, report)
        eval_loss, fid, translated = self._evaluate(run, rnd, round_config)
        accepted = [r for r in report if r["accepted"]]
        row = {"round": rnd, "accepted": len(accepted), "reason": "kept previous global model" if kept else "",
               "num_examples": sum(r.get(NUM_EXAMPLES, 0) for r in accepted), "train_loss": weighted_mean(accepted, "train_loss"),
               "eval_loss": eval_loss, "fid": fid.get("fid_global", ""), "seconds": time.perf_counter() - t0,
               **{k: translated[k] for k in TRANSLATION_METRIC_KEYS if k in translated}}
        self.record.round(phase, row)
        row["max_epsilon"] = max((float(r["epsilon"]) for r in accepted if "epsilon" in r), default=float("nan"))
        self.state.history.append({"phase": phase.name, "round": rnd, "accepted": len(accepted),
                                   "rejected": len(report) - len(accepted), "refused": counts["refused"],
                                   "train_loss": row["train_loss"], "eval_loss": eval_loss, "max_epsilon": row["max_epsilon"],
                                   "fid": fid.get("fid_global"), "seconds": row["seconds"], **translated})
        say(round_line(self.cfg, phase, rnd, counts, row, kept))
        if self.cfg.privacy.enabled:
            save_site_ledgers(self.run_dir, self.state.ledgers, refused=sorted(self.state.refused_sites))
        save_round_checkpoint(self.ckpt_dir, self.cfg, run, rnd, report, self.state, initial=self.initial, codec=self.codec)
        return not self._too_many_failures(kept, rnd, phase)

    def _enough_nodes(self, rnd: int) -> bool:
        """False, with the run marked failed, when ``min_train_nodes`` sites never connect."""
        problem = wait_for_nodes(self._live_nodes, self.cfg.federation, rnd)
        if problem:
            self.failed, self.stop_reason = True, problem
            say(problem)
        return not problem

    def _train(self, run: PhaseRun, rnd: int, round_config: RoundConfig) -> tuple[list[dict], dict]:
        """Send, sort, screen, aggregate; ``(report, counts)`` with one report entry per reply."""
        fed = self.cfg.federation
        messages = run.strategy.configure_train(rnd, ArrayRecord(run.global_state), round_config.to_record(), self.grid)
        messages = [m for m in messages if m.metadata.dst_node_id not in self.state.refused_nodes]
        replies = sort_replies(self.grid.send_and_receive(messages=messages, timeout=fed.round_timeout))
        learn_node_sites(replies.updates + replies.refusals + replies.failures, self.state.node_sites)
        self.state.merge_privacy(replies.updates, replies.refusals)
        current = {k: v.detach().cpu().numpy() for k, v in run.global_state.items()}
        screened = screen(rnd, replies.updates, {k: current[k] for k in run.update_keys}, norm_factor=fed.max_update_norm_ratio,
                          frozen={k: v for k, v in current.items() if k not in run.update_keys})
        new_arrays = aggregate(run.strategy, rnd, screened, min_valid=fed.min_train_nodes)
        report = round_report(rnd, screened.report, replies, self.state.node_sites, self.run_dir / "logs" / "site_errors.log",
                              {m.metadata.message_id: m.metadata.dst_node_id for m in messages})
        if replies.missing_autoencoder:
            self.latent.install(self.codec, [r.metadata.src_node_id for r in replies.missing_autoencoder])
        if new_arrays is not None:
            self._apply(run, new_arrays)
        return report, round_counts(report, replies, kept=new_arrays is None)

    def _apply(self, run: PhaseRun, new_arrays: ArrayRecord) -> None:
        central = self.state.central
        if central["mode"] != "off":  # one more noisy release of the central mechanism
            central["releases"] += 1
            central["clipping_norms"].append(float(run.strategy.clipping_norm))
            save_central(self.run_dir, central)
        run.global_state = run.merged(arrays_to_state(new_arrays))
        run.model.load_state_dict(run.global_state)
        if run.ema is not None:
            run.ema.update(run.model)

    def _evaluate(self, run: PhaseRun, rnd: int, round_config: RoundConfig) -> tuple[float, dict, dict]:
        """``(held-out loss, FID, translation scores: weighted means and "translation_per_site", or {})``."""
        ev = self.cfg.evaluation
        with_fid = run.phase.draws_samples and bool(ev.every) and rnd % ev.every == 0
        rows, site_stats = self.evaluation.held_out(run.strategy, rnd, run.global_state, round_config, with_fid=with_fid)
        fid = self.evaluation.federated_fid(run.ema, run.sample_model, site_stats) if site_stats else {}
        self.record.evaluation(rnd, run.phase, rows, fid.get("fid_per_site", {}))
        scored = [r for r in rows if translation_scores(r)]
        translated = {**{k: weighted_mean(scored, k) for k in TRANSLATION_METRIC_KEYS},
                      "translation_per_site": {f"site_{int(r[SITE_INDEX])}": translation_scores(r) for r in scored}}
        return weighted_mean(rows, "eval_loss"), fid, translated if scored else {}

    def _too_many_failures(self, kept: bool, rnd: int, phase: TrainingPhase) -> bool:
        fed = self.cfg.federation
        self.state.failed_streak = self.state.failed_streak + 1 if kept else 0
        if self.state.failed_streak < fed.max_failed_rounds:
            return False
        self.failed = True
        self.stop_reason = (f"failed after {phase.name} round {rnd}: {self.state.failed_streak} consecutive round(s) without "
                            f"min_train_nodes={fed.min_train_nodes} valid updates (federation.max_failed_rounds="
                            f"{fed.max_failed_rounds}); the reasons are in metrics.csv and logs/site_errors.log")
        say(self.stop_reason)
        return True

    def _finish(self) -> dict:
        summary = build_summary(self.run_dir, self.cfg, self.state, stop_reason=self.stop_reason, failed=self.failed,
                                codec=self.codec, weight_transfers=self.latent.transfers)
        write_summary(self.run_dir, self.cfg, summary)
        return summary
