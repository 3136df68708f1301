"""The federated round loop as a plain function over a Flower ``Grid``.

Each round: configure and send training to sampled sites, screen and aggregate their updates,
update the server-side EMA, evaluate on every site's held-out data, append per-site and global
rows to ``metrics.csv``, draw a sample grid every ``output.sample_every`` rounds, and write a
checkpoint (global and EMA weights, strategy state, round, config, per-site metrics, per-site
privacy ledgers, RNG state). ``resume_from`` continues at the round after the checkpoint's; with
fixed seeds and no DP the result equals an uninterrupted run, since sites seed their randomness
by (seed, round, site) and updates are aggregated in site order (DP noise is unpredictable on
purpose, so DP runs resume correctly but not bit-identically).

Privacy: a site whose budget does not cover a round refuses it; the server stops sampling it and
ends the run cleanly, saying why, once fewer than ``min_train_nodes`` sites have budget left. The
privacy report (``privacy_report.{json,md,png}``) is written at the end of every DP run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from configs import ExperimentConfig, config_to_dict, config_to_yaml, load_config_dict
from meddiff.build import build_model
from meddiff.checkpoint import load_checkpoint, save_checkpoint
from meddiff.ema import EMA
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
METRIC_FIELDS = ["round", "scope", "node", "accepted", "reason", "num_examples", "train_loss", "eval_loss", "fid", "steps",
                 "seconds", *PRIVACY_FIELDS]


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Float32 tensors of an aggregated ``ArrayRecord`` (the strategy may return float64)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in record.to_torch_state_dict().items()}


def _numpy(state) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _say(msg: str) -> None:
    log.info(msg)
    print(f"[meddiff] {msg}", flush=True)


def run_federation(grid: Grid, cfg: ExperimentConfig, *, run_dir: Path, resume_from: str = "",
                   manifest_path: str = "") -> dict:
    """Run ``federation.num_rounds`` rounds; returns a summary dict (also written to ``summary.json``)."""
    fed, out = cfg.federation, cfg.output
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_yaml = config_to_yaml(cfg)
    (run_dir / "config.yaml").write_text(cfg_yaml)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.image_size)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=fed.server_ema_decay)
    strategy = create_strategy(fed, cfg.privacy)
    screened = base_strategy(strategy)
    screened.norm_factor = fed.max_update_norm_ratio
    first_round = 1
    history: dict = {"rounds": []}
    # the sites' privacy state belongs to the study, which a resumed run continues
    study = {"study-id": f"{run_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}", "site-state-root": str(run_dir / "site_state")}
    ledgers: dict = {}
    exhausted_sites: set[str] = set()
    central = {"mode": cfg.privacy.central_dp, "noise_multiplier": cfg.privacy.central_noise_multiplier,
               "clipping_norm": cfg.privacy.central_clipping_norm, "sampled_sites": sampled_sites(fed),
               "num_sites": fed.num_sites, "releases": 0, "clipping_norms": []}
    if resume_from:
        ckpt = load_checkpoint(resume_from)
        stored = load_config_dict(ckpt.config)
        if stored.model != cfg.model or stored.diffusion != cfg.diffusion:
            raise ValueError(f"{resume_from}: its model/diffusion config differs from this run's; resume with the same config")
        global_state = ckpt.model
        ema.load_state_dict(ckpt.ema, num_updates=int(ckpt.extra.get("ema_updates", 0)))
        load_strategy_state(screened, ckpt.extra.get("strategy_state", {}))
        history = json.loads(ckpt.extra.get("history", '{"rounds": []}'))
        if "torch_rng" in ckpt.extra:
            torch.set_rng_state(ckpt.extra["torch_rng"])
        first_round = ckpt.step + 1
        study = json.loads(ckpt.extra.get("study", json.dumps(study)))
        ledgers = json.loads(ckpt.extra.get("privacy_ledgers", "{}"))
        exhausted_sites = set(json.loads(ckpt.extra.get("exhausted_sites", "[]")))
        central = json.loads(ckpt.extra.get("central_dp", json.dumps(central)))
        _say(f"resuming from {resume_from} at round {first_round} (study {study['study-id']})")

    payload = {"experiment-config": cfg_yaml, "manifest-path": manifest_path, "central-dp": cfg.privacy.central_dp, **study}
    exhausted_nodes: set[int] = set()
    stop_reason = ""
    metrics = MetricsCSV(run_dir / "metrics.csv", METRIC_FIELDS)
    ckpt_dir = run_dir / "checkpoints"
    sample_model = build_model(cfg.model, cfg.data.image_size)

    def draw(rnd: int) -> None:
        ema.copy_to(sample_model)
        samples = sample_images(sample_model, cfg, num=out.num_samples, device=torch.device("cpu"), seed=cfg.train.seed, progress=False)
        write_samples(samples, run_dir / "samples", f"round_{rnd:04d}")

    with metrics:
        for rnd in range(first_round, fed.num_rounds + 1):
            t0 = time.perf_counter()
            if exhausted_nodes and len(set(grid.get_node_ids()) - exhausted_nodes) < fed.min_train_nodes:
                stop_reason = (f"stopped before round {rnd}: only {len(set(grid.get_node_ids()) - exhausted_nodes)} site(s) have "
                               f"privacy budget left (or accept this run's privacy settings), fewer than min_train_nodes={fed.min_train_nodes} "
                               f"(exhausted: {', '.join(sorted(exhausted_sites))})")
                _say(stop_reason)
                break
            screened.reference = _numpy(global_state)
            messages = strategy.configure_train(rnd, ArrayRecord(global_state), ConfigRecord(payload), grid)
            messages = [m for m in messages if m.metadata.dst_node_id not in exhausted_nodes]
            replies = list(grid.send_and_receive(messages=messages, timeout=fed.round_timeout))
            ledgers, refused = _collect_privacy(replies, ledgers)
            exhausted_nodes |= set(refused)
            exhausted_sites |= set(refused.values())
            new_arrays, _ = strategy.aggregate_train(rnd, [r for r in replies if not is_refusal(r)])
            report = getattr(screened, "round_report", []) + [refusal_report(rnd, r) for r in replies if is_refusal(r)]
            kept = new_arrays is None
            if not kept and central["mode"] != "off":  # one more noisy release of the central mechanism
                central["releases"] += 1
                central["clipping_norms"].append(float(strategy.clipping_norm))
                save_central(run_dir, central)
            if not kept:
                global_state = arrays_to_state(new_arrays)
                model.load_state_dict(global_state)
                ema.update(model)
            accepted = [r for r in report if r["accepted"]]
            for r in report:
                metrics.write({"round": rnd, "scope": f"site_{r['site']}", "node": r["node"], "accepted": int(r["accepted"]),
                               "reason": r["reason"], "num_examples": r.get("num-examples", ""),
                               "train_loss": r.get("train_loss", ""), "steps": r.get("steps", ""), "seconds": r.get("seconds", ""),
                               **{k: r.get(k, "") for k in PRIVACY_FIELDS}})
            # evaluation of the new global model on every site's held-out data (and, every
            # evaluation.every rounds, the sites' feature statistics for a federated FID)
            with_fid = bool(cfg.evaluation.every) and rnd % cfg.evaluation.every == 0
            eval_payload = {**payload, "fid-stats": int(with_fid)}
            eval_msgs = strategy.configure_evaluate(rnd, ArrayRecord(global_state), ConfigRecord(eval_payload), grid)
            eval_rows, site_stats = [], {}
            for reply in grid.send_and_receive(messages=eval_msgs, timeout=fed.round_timeout):
                if reply.has_error() or "metrics" not in reply.content:
                    continue
                m = dict(reply.content["metrics"])
                eval_rows.append(m)
                if with_fid and "feature-stats" in reply.content.array_records:
                    site_stats[f"site_{int(m['site-index'])}"] = _feature_stats(reply.content["feature-stats"], m)
            fid = _federated_fid(cfg, ema, sample_model, site_stats) if site_stats else {}
            for m in eval_rows:
                scope = f"site_{int(m['site-index'])}"
                metrics.write({"round": rnd, "scope": scope, "accepted": "", "num_examples": m["num-examples"],
                               "eval_loss": m["eval_loss"], "fid": fid.get("fid_per_site", {}).get(scope, "")})
            n_train = sum(r.get("num-examples", 0) for r in accepted)
            train_loss = sum(r["train_loss"] * r["num-examples"] for r in accepted) / n_train if n_train else float("nan")
            n_eval = sum(m["num-examples"] for m in eval_rows)
            eval_loss = sum(m["eval_loss"] * m["num-examples"] for m in eval_rows) / n_eval if n_eval else float("nan")
            seconds = time.perf_counter() - t0
            metrics.write({"round": rnd, "scope": "global", "accepted": len(accepted),
                           "reason": "kept previous global model" if kept else "", "num_examples": n_train,
                           "train_loss": train_loss, "eval_loss": eval_loss, "fid": fid.get("fid_global", ""), "seconds": seconds})
            max_eps = max((float(r["epsilon"]) for r in accepted if "epsilon" in r), default=float("nan"))
            history["rounds"].append({"round": rnd, "accepted": len(accepted), "rejected": len(report) - len(accepted),
                                      "refused": len(refused), "train_loss": train_loss, "eval_loss": eval_loss,
                                      "max_epsilon": max_eps, "fid": fid.get("fid_global"), "seconds": seconds})
            _say(f"round {rnd}/{fed.num_rounds}: {len(accepted)} update(s) aggregated, {len(report) - len(accepted)} rejected "
                 f"({len(refused)} refused for budget); train loss {train_loss:.4f}, held-out loss {eval_loss:.4f}"
                 + (f", max site epsilon {max_eps:.3f}" if cfg.privacy.enabled else "") + f" ({seconds:.1f}s)")
            if cfg.privacy.enabled:
                save_site_ledgers(run_dir, ledgers, exhausted=sorted(exhausted_sites))
            if out.sample_every and rnd % out.sample_every == 0 and rnd != fed.num_rounds:
                draw(rnd)
            extra = {"round": rnd, "ema_updates": ema.num_updates, "strategy_state": strategy_state(screened),
                     "site_metrics": json.dumps(report, default=float), "history": json.dumps(history),
                     "torch_rng": torch.get_rng_state(), "study": json.dumps(study), "privacy_ledgers": json.dumps(ledgers),
                     "exhausted_sites": json.dumps(sorted(exhausted_sites)), "central_dp": json.dumps(central)}
            for name in (f"round_{rnd:04d}.pt", "last.pt"):
                save_checkpoint(ckpt_dir / name, model_state=global_state, ema_state=ema.state_dict(),
                                config=config_to_dict(cfg), step=rnd, extra=extra)
    last_round = history["rounds"][-1]["round"] if history["rounds"] else 0
    draw(last_round)
    summary = {"run_dir": str(run_dir), "rounds": history["rounds"], "checkpoint": str(ckpt_dir / "last.pt"),
               "samples": str(run_dir / "samples" / f"round_{last_round:04d}.png"), "stop_reason": stop_reason,
               "private": cfg.privacy.enabled}
    if cfg.privacy.enabled:
        save_site_ledgers(run_dir, ledgers, exhausted=sorted(exhausted_sites))
        summary["epsilon"] = {name: led["epsilon"] for name, led in sorted(ledgers.items())}
    if ledgers or central["releases"]:
        summary["privacy_report"] = str(write_privacy_report(run_dir)["md"])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    _write_summary_md(run_dir, cfg, summary)
    return summary


def _feature_stats(record: ArrayRecord, metrics: dict):
    from meddiff.evaluate import FeatureStats

    arrays = record.to_torch_state_dict()
    return FeatureStats(int(metrics["feature-count"]), arrays["mean"].double().numpy(), arrays["cov"].double().numpy())


def _federated_fid(cfg: ExperimentConfig, ema: EMA, model, site_stats: dict) -> dict:
    """FID of EMA samples against the merged site statistics (and per site); no image left a site."""
    from meddiff.evaluate import build_encoder, federated_fid

    ev = cfg.evaluation
    ema.copy_to(model)
    samples = sample_images(model, cfg, num=ev.num_samples, device=torch.device("cpu"), seed=cfg.train.seed + 1, progress=False)
    features = build_encoder(ev.encoder, ev.encoder_weights or None).encode(samples)
    result = federated_fid(features, site_stats)
    _say(f"federated FID ({ev.encoder}) {result['fid_global']:.3f}; per site: "
         + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result["fid_per_site"].items())))
    return result


def _collect_privacy(replies, ledgers: dict) -> tuple[dict, dict[int, str]]:
    """Merge the ledgers carried by DP replies; ``{node_id: site}`` of the sites that refused for budget."""
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
    return update_site_ledgers(ledgers, found), refused


def _write_summary_md(run_dir: Path, cfg: ExperimentConfig, summary: dict) -> None:
    fed = cfg.federation
    lines = [
        f"# meddiff-fl federated run", "",
        f"- strategy: `{fed.strategy}`, {fed.num_rounds} rounds x {fed.local_steps} local steps, {fed.num_sites} sites",
        f"- data: `{cfg.data.dataset}` at {cfg.data.image_size}px; model: ADM, {cfg.model.model_channels} base channels",
        f"- config: `{run_dir / 'config.yaml'}`", f"- metrics: `{run_dir / 'metrics.csv'}`",
        f"- final checkpoint: `{summary['checkpoint']}`", f"- final EMA samples: `{summary['samples']}`",
        f"- privacy: " + (f"DP-SGD at every site; report `{summary.get('privacy_report', 'none (no DP site replied)')}`; "
                          f"final epsilon per site: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.get("epsilon", {}).items())
                          if cfg.privacy.enabled else "none (privacy.enabled=false: epsilon is infinite)"),
    ]
    if summary.get("stop_reason"):
        lines.append(f"- **ended early**: {summary['stop_reason']}")
    lines += ["", "| round | accepted | rejected | refused (budget) | train loss | held-out loss | max site epsilon | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["rounds"]:
        lines.append(f"| {r['round']} | {r['accepted']} | {r['rejected']} | {r.get('refused', 0)} | {r['train_loss']:.4f} | "
                     f"{r['eval_loss']:.4f} | {r.get('max_epsilon', float('nan')):.3f} | {r['seconds']:.1f} |")
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
