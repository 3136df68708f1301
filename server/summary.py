"""The record a federated run leaves: ``metrics.csv`` rows, TensorBoard scalars, the console line
of each round, and ``summary.{json,md}`` at the end."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

from configs import ExperimentConfig
from meddiff.board import RunBoard
from meddiff.recipes.phases import TrainingPhase, denoiser_phase, phase_named
from meddiff.recipes.runs import MetricsCSV
from privacy.report import save_site_ledgers, write_privacy_report
from meddiff.data.phantom_anatomy import HU_CONTRASTS
from protocol import NUM_EXAMPLES, SEGMENTATION_COLUMNS, SITE_INDEX, TRANSLATION_METRIC_KEYS
from protocol.keys import TRANSLATION_MAE, TRANSLATION_PSNR, TRANSLATION_SSIM
from server.site_segmentation import column_dice, segmentation_table

log = logging.getLogger("meddiff.server")

PRIVACY_FIELDS = ["epsilon", "delta", "noise_multiplier", "sample_rate", "clip_fraction", "budget_exhausted"]
#: A site's segmentation utility (headline region's Dice): real only, synthetic only, real + synthetic, mask fidelity.
SEGMENTATION_FIELDS = [f"seg_{c}" for c in SEGMENTATION_COLUMNS]
METRIC_FIELDS = ["round", "phase", "scope", "node", "accepted", "reason", "num_examples", "train_loss", "eval_loss", "fid",
                 "steps", "seconds", *PRIVACY_FIELDS, *SEGMENTATION_FIELDS, *TRANSLATION_METRIC_KEYS]


def translation_scores(metrics: dict) -> dict[str, float]:
    """The translation scores of a site's (or a round's) metrics (PSNR may be ``inf``: a perfect
    translation); empty unless it translates (NaN)."""
    return {k: float(metrics[k]) for k in TRANSLATION_METRIC_KEYS if k in metrics and not math.isnan(float(metrics[k]))}


def say(msg: str) -> None:
    log.info(msg)
    print(f"[meddiff] {msg}", flush=True)


class RunRecord:
    """``metrics.csv`` and the TensorBoard event files of one federated run."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig):
        self.metrics = MetricsCSV(run_dir / "metrics.csv", METRIC_FIELDS)
        self.board = RunBoard(run_dir, enabled=cfg.output.tensorboard)

    def sites(self, rnd: int, phase: TrainingPhase, report: list[dict]) -> None:
        """One row per site reply of a training round (accepted, or the reason it was not)."""
        for r in report:
            scope = f"site_{r['site']}" if int(r["site"]) >= 0 else f"node_{r['node']}"
            self.metrics.write({"round": rnd, "phase": phase.name, "scope": scope, "node": r["node"], "accepted": int(r["accepted"]),
                                "reason": r["reason"], "num_examples": r.get(NUM_EXAMPLES, ""),
                                "train_loss": r.get("train_loss", ""), "steps": r.get("steps", ""),
                                "seconds": r.get("seconds", ""), **{k: r.get(k, "") for k in PRIVACY_FIELDS}})
            if r["accepted"]:
                self.board.scalars(phase.scope(scope), {k: r.get(k) for k in ("train_loss", "epsilon", "clip_fraction")}, rnd)

    def evaluation(self, rnd: int, phase: TrainingPhase, rows: list[dict], fid_per_site: dict) -> None:
        for m in rows:
            scope = f"site_{int(m[SITE_INDEX])}"
            scores = translation_scores(m)
            self.metrics.write({"round": rnd, "phase": phase.name, "scope": scope, "accepted": "", "num_examples": m[NUM_EXAMPLES],
                                "eval_loss": m["eval_loss"], "fid": fid_per_site.get(scope, ""), **scores})
            self.board.scalars(phase.scope(scope), {"eval_loss": m["eval_loss"], "fid": fid_per_site.get(scope), **scores}, rnd)

    def segmentation(self, entry: dict) -> None:
        """One row per site of a segmentation-utility entry (the headline region's Dice; ``num_examples``:
        the held-out pairs scored), every region's Dice in TensorBoard."""
        phase, rnd = phase_named(entry["phase"]), entry["round"]
        for scope, site in entry["sites"].items():
            dice = column_dice(site, entry["region"])
            self.metrics.write({"round": rnd, "phase": phase.name, "scope": scope, "accepted": "", "num_examples":
                                site["num_real_test"], "seconds": site["seconds"],
                                **{f"seg_{c}": "" if d is None else d for c, d in dice.items()}})
            self.board.scalars(phase.scope(scope), {f"segmentation/{c}/{region}": s["dice"] for c in SEGMENTATION_COLUMNS
                                                    for region, s in site["scores"][c].items()}, rnd)
        self.board.flush()

    def round(self, phase: TrainingPhase, row: dict) -> None:
        self.metrics.write({"phase": phase.name, "scope": "global", **row})
        self.board.scalars(phase.scope("global"), {k: row.get(k) for k in ("train_loss", "eval_loss", "fid", "accepted",
                                                                            *TRANSLATION_METRIC_KEYS)}, row["round"])
        self.board.flush()

    def close(self) -> None:
        self.metrics.close()
        self.board.close()

    def __enter__(self) -> "RunRecord":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def supersede_rows_after(path: Path, phase: str | TrainingPhase, rnd: int) -> int:
    """Move the rows of ``metrics.csv`` that come after ``(phase, round)`` into
    ``metrics_superseded.csv`` (a run resumed from an earlier checkpoint redoes those rounds);
    returns how many moved. Nothing is deleted."""
    if not path.is_file():
        return 0
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames or METRIC_FIELDS, list(reader)
    order = (phase if isinstance(phase, TrainingPhase) else phase_named(phase)).order
    later = [r for r in rows if (phase_named(r.get("phase")).order, int(r["round"] or 0)) > (order, rnd)]
    if not later:
        return 0
    old = path.with_name("metrics_superseded.csv")
    with open(old, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if fh.tell() == 0:
            writer.writeheader()
        writer.writerows(later)
    kept = [r for r in rows if r not in later]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    return len(later)


def round_line(cfg: ExperimentConfig, phase: TrainingPhase, rnd: int, counts: dict, row: dict, kept: bool) -> str:
    """The console line of one round."""
    what, name, num_rounds = phase.metric_name, phase.round_name(cfg), phase.num_rounds(cfg)
    fate = (f"{counts['accepted']} valid update(s), fewer than min_train_nodes={cfg.federation.min_train_nodes}: "
            "kept the previous global model") if kept else f"{counts['accepted']} update(s) aggregated"
    extra = "".join(f", {n} {k}" for k, n in (("rejected", counts["rejected"]), ("refused", counts["refused"]),
                                                ("failed", counts["failed"]), ("lost", counts["lost"])) if n)
    eps = f", max site epsilon {row['max_epsilon']:.3f}" if cfg.privacy.enabled and math.isfinite(row["max_epsilon"]) else ""
    scores = translation_scores(row)
    translated = (f", held-out SSIM {scores[TRANSLATION_SSIM]:.3f}, PSNR {scores[TRANSLATION_PSNR]:.2f} dB, "
                  f"MAE {scores[TRANSLATION_MAE]:.4g}") if len(scores) == len(TRANSLATION_METRIC_KEYS) else ""
    return (f"{name} {rnd}/{num_rounds}: {fate}{extra}; train loss {row['train_loss']:.4f}, {what} "
            f"{row['eval_loss']:.4f}{translated}{eps} ({row['seconds']:.1f}s)")


def write_summary(run_dir: Path, cfg: ExperimentConfig, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    (run_dir / "summary.md").write_text(_summary_md(run_dir, cfg, summary))


def _summary_md(run_dir: Path, cfg: ExperimentConfig, summary: dict) -> str:
    fed, ae = cfg.federation, cfg.autoencoder
    model = "latent diffusion (ADM on autoencoder latents)" if ae.enabled else "ADM"
    lines = ["# meddiff-fl federated run", "", f"- status: **{summary['status']}**",
             f"- strategy: `{fed.strategy}`, {fed.num_rounds} rounds x {fed.local_steps} local steps, {fed.num_sites} sites",
             f"- data: `{cfg.data.dataset}` at {cfg.data.image_size}px ({cfg.model.spatial_dims}-D); model: {model}, "
             f"{cfg.model.model_channels} base channels"]
    if ae.enabled:
        first = {"dp": f"federated, {ae.num_rounds} rounds x {ae.local_steps} steps, DP-SGD at every site",
                 "not_private": f"federated, {ae.num_rounds} rounds x {ae.local_steps} steps, **not private**",
                 "public": "pre-trained on public data / loaded; never trained on site data"}[ae.mode]
        scale = summary.get("autoencoder", {}).get("scale_factor")
        lines.append(f"- autoencoder (phase 1): {first}; latent {ae.latent_channels} x {cfg.unet_input_size}^{cfg.model.spatial_dims}"
                     + (f", scale factor {scale:.4f}" if scale else ""))
    lines += [f"- config: `{run_dir / 'config.yaml'}`", f"- metrics: `{run_dir / 'metrics.csv'}` (TensorBoard: "
              f"`tensorboard --logdir {run_dir / 'tensorboard'}`)", f"- final checkpoint: `{summary['checkpoint']}`",
              f"- final EMA samples: `{summary['samples'] or 'none (no diffusion round ran)'}`", "- privacy: " + _privacy(cfg, summary)]
    if summary.get("stop_reason"):
        lines.append(f"- **ended early**: {summary['stop_reason']}")
    lines += ["", "| phase | round | accepted | rejected | refused (budget) | train loss | held-out loss | max site epsilon | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["rounds"]:
        lines.append(f"| {phase_named(r.get('phase')).name} | {r['round']} | {r['accepted']} | {r['rejected']} | {r.get('refused', 0)} | "
                     f"{r['train_loss']:.4f} | {r['eval_loss']:.4f} | {r.get('max_epsilon', float('nan')):.3f} | {r['seconds']:.1f} |")
    for entry in summary.get("segmentation", []):
        lines += ["", *segmentation_table(entry)]
    return "\n".join(lines + _translation_table(cfg, summary["rounds"])) + "\n"


def _translation_table(cfg: ExperimentConfig, rounds: list[dict]) -> list[str]:
    """Each site's SSIM / PSNR / MAE on its own held-out pairs, per round (none unless the study translates)."""
    scored = [r for r in rounds if r.get("translation_per_site")]
    if not scored:
        return []
    unit = "HU" if cfg.data.target_sequence in HU_CONTRASTS else "[0, 1]"
    lines = ["", f"Translation {cfg.data.source_sequence} -> {cfg.data.target_sequence} on each site's own held-out pairs "
             f"({cfg.evaluation.translation_examples} per site, one DDIM sample for diffusion; MAE in {unit}):", "",
             "| phase | round | site | SSIM | PSNR (dB) | MAE |", "| --- | --- | --- | --- | --- | --- |"]
    for r in scored:
        for site, s in sorted(r["translation_per_site"].items()):
            ssim, psnr, mae = (s.get(k, math.nan) for k in (TRANSLATION_SSIM, TRANSLATION_PSNR, TRANSLATION_MAE))
            lines.append(f"| {r['phase']} | {r['round']} | {site} | {ssim:.3f} | {psnr:.2f} | {mae:.4g} |")
    return lines


def _privacy(cfg: ExperimentConfig, summary: dict) -> str:
    if not cfg.privacy.enabled:
        return "none (privacy.enabled=false: epsilon is infinite)"
    eps = ", ".join(f"{k} {v:.3f}" for k, v in summary.get("epsilon", {}).items())
    return f"DP-SGD at every site; report `{summary.get('privacy_report', 'none (no DP site replied)')}`; final epsilon per site: {eps}"


def build_summary(run_dir: Path, cfg: ExperimentConfig, state, *, stop_reason: str, failed: bool, codec,
                  weight_transfers: int) -> dict:
    """``summary.json``'s content; writes the server's site ledgers and the privacy report too."""
    rounds = state.history
    final = [r for r in rounds if phase_named(r.get("phase")) is denoiser_phase(cfg)]
    last_round = final[-1]["round"] if final else 0
    drew = bool(final) and denoiser_phase(cfg).draws_samples  # a translation study draws no sample grids
    summary = {"run_dir": str(run_dir), "rounds": rounds, "checkpoint": str(run_dir / "checkpoints" / "last.pt"),
               "samples": str(run_dir / "samples" / f"round_{last_round:04d}.png") if drew else None,
               "status": final_status(stop_reason, failed, sum(r["accepted"] > 0 for r in rounds)),
               "stop_reason": stop_reason, "private": cfg.privacy.enabled, "latent_diffusion": cfg.autoencoder.enabled}
    if state.segmentation:
        summary["segmentation"] = state.segmentation
    if codec is not None:
        summary["autoencoder"] = {"mode": cfg.autoencoder.mode, "digest": codec.digest,
                                  "scale_factor": codec.scale_factor, "weight_transfers": weight_transfers}
    if cfg.privacy.enabled:
        save_site_ledgers(run_dir, state.ledgers, refused=sorted(state.refused_sites))
        summary["epsilon"] = {name: led["epsilon"] for name, led in sorted(state.ledgers.items())}
    if state.ledgers or state.central["releases"]:
        summary["privacy_report"] = str(write_privacy_report(run_dir)["md"])
    return summary


def final_status(stop_reason: str, failed: bool, aggregated_rounds: int) -> str:
    """``completed``, ``stopped`` (the sites' budgets or policies ended it) or ``failed``."""
    if failed or not aggregated_rounds:
        return "failed"
    return "stopped" if stop_reason else "completed"
