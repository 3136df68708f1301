"""DP-SGD quality on real data: training from scratch against fine-tuning from public pre-training.

PneumoniaMNIST (real chest X-rays, 28x28), 3 IID pseudo-sites, the default ADM (attention at 7x7).
``partition.public_fraction=0.25`` carves public patients out before the sites are assigned
(disjoint from every site and held-out set); every arm runs on that one split (checked), and one
centralized non-private model trained on the public split with ``configs/dp.yaml``'s
``pretraining`` settings (cost reported separately) starts the pre-trained arms (``train.init_from``):

- ``nonprivate``: ``configs/default.yaml``, federated without DP, from scratch (batch 16);
- ``dp_scratch``: the DP recipe ``configs/dp.yaml`` (logical batch 128, lr 2e-3, no warm-up,
  physical batches of 64, ``bk``, C = 1, delta = 1/(10 N_site)) without pre-training, epsilon 10;
- ``dp_pretrained_full``: the same from the public model, every parameter trained, epsilon 10;
- ``dp_pretrained_peft``: the same with ``train.trainable=lora`` (rank 8, FFA-LoRA, lr 5e-3): only
  the adapters train and travel;
- ``dp_pretrained_eps1``: from the public model at epsilon 1, in the mode (full or lora) whose
  epsilon-10 arm reached the lower domain-FID in this run.

Same compute per arm: every site makes the same number of per-example forward/backward passes,
steps x logical batch x noise multiplicity K: ``--steps`` steps of the default (batch 16, K = 1)
over its 4 rounds, so a DP arm (batch 128, K = 1) takes an eighth as many steps.

Each final checkpoint (the server's EMA) and the public model are evaluated by ``evaluate_checkpoint``
with one domain encoder trained on the real training split: domain-FID against the test split,
precision/recall, TSTR against TRTR; membership inference by the loss attack, the sites' training
records (members) against the test split (seen by no model), matched per class (and each site
against its own held-out records). Bytes per site per round: a real reply (``reply_bytes``); DP step
time: the sites' seconds per optimizer step in the run (3 sites share the CPU).

    python bench/dp_quality.py [--data ../shared/data/pneumoniamnist.npz] [--steps 256] [--samples 256]

``--steps`` scales every arm (raise it, ``--pretrain-steps`` and ``--samples`` on a GPU). Prints one
JSON object; writes it, a Markdown table and the sample grids side by side under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from bench.common import domain_encoder, members_mia, reply_bytes, side_by_side, site_step_seconds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"
SITES, PUBLIC_FRACTION = 3, 0.25
PEFT = ["train.trainable=lora", "train.lora_rank=8", "train.lr=0.005"]  # adapters take a larger step
ARMS = {  # config file, start from the public model, overrides
    "nonprivate": ("default.yaml", False, []),
    "dp_scratch": ("dp.yaml", False, []),
    "dp_pretrained_full": ("dp.yaml", True, []),
    "dp_pretrained_peft": ("dp.yaml", True, PEFT),
    "dp_pretrained_eps1": ("dp.yaml", True, ["privacy.target_epsilon=1"]),  # + the better fine-tuning mode
}


def base_overrides(data: Path, work: Path, name: str) -> list[str]:
    """The data, split and model every arm shares (the default ADM, attention at 7x7 for 28x28)."""
    return [
        "data.dataset=medmnist", f"data.path={data}", "data.image_size=28", "model.num_classes=2",
        "model.attention_resolutions=[7]", "sampler.num_inference_steps=50", "output.num_samples=16",
        f"output.root={work}", f"output.name={name}", "partition.scheme=iid", "partition.scanner_shift=false",
        "partition.test_fraction=0.0", "partition.site_test_fraction=0.05", f"partition.public_fraction={PUBLIC_FRACTION}",
        f"federation.num_sites={SITES}", f"federation.min_train_nodes={SITES}", "pretraining.steps=0",
    ]


def arm_config(arm: str, overrides: list[str], steps: int, base: list[str], public_ckpt: Path):
    """One arm's config, its local steps set so that a site makes the per-example forward/backward
    passes (steps x batch x K) of ``steps`` steps of ``configs/default.yaml``."""
    from configs import load_config

    file, init, own = ARMS[arm]
    ov = base + own + overrides + ([f"train.init_from={public_ckpt}"] if init else [])
    ref, cfg = load_config(CONFIGS / "default.yaml", base), load_config(CONFIGS / file, ov)
    passes = steps * ref.train.batch_size * ref.diffusion.noise_multiplicity
    local = max(1, round(passes / (cfg.train.batch_size * cfg.diffusion.noise_multiplicity * cfg.federation.num_rounds)))
    warmup = min(cfg.train.warmup_steps, local * cfg.federation.num_rounds // 10)
    return load_config(CONFIGS / file, ov + [f"federation.local_steps={local}", f"train.warmup_steps={warmup}"])


def plan(cfg) -> dict:
    """What an arm's config sets: privacy, start, trainable parameters and compute per site."""
    t, steps = cfg.train, cfg.federation.num_rounds * cfg.federation.local_steps
    return {"epsilon_target": cfg.privacy.target_epsilon if cfg.privacy.enabled else None, "from_public": bool(t.init_from),
            "trainable": t.trainable + (f" r={t.lora_rank}" if t.trainable == "lora" else ""), "lr": t.lr,
            "warmup_steps": t.warmup_steps, "batch": t.batch_size, "noise_multiplicity": cfg.diffusion.noise_multiplicity,
            "rounds": cfg.federation.num_rounds, "local_steps": cfg.federation.local_steps, "site_steps": steps,
            "passes_per_site": steps * t.batch_size * cfg.diffusion.noise_multiplicity}


def pretrain(data: Path, work: Path, steps: int | None) -> tuple[Path, Path, dict]:
    """Split once, then pre-train centrally, without DP, on the public split as ``configs/dp.yaml``'s
    ``pretraining`` section does before a study. Returns (checkpoint, manifest, cost)."""
    import dataclasses

    from configs import load_config
    from meddiff.recipes.centralized import train_centralized
    from meddiff.recipes.pretraining import pretraining_config
    from meddiff.recipes.sites import load_manifest, public_dataset
    from sim.manifest import build_manifest, write_manifest

    cfg = load_config(CONFIGS / "dp.yaml", [o for o in base_overrides(data, work, "split") if not o.startswith("pretraining.")])
    if steps is not None:
        cfg = dataclasses.replace(cfg, pretraining=dataclasses.replace(cfg.pretraining, steps=steps))
    manifest_path = write_manifest(build_manifest(cfg), work / "split")
    public = public_dataset(load_manifest(manifest_path), cfg)
    pcfg = pretraining_config(cfg, work)
    t0 = time.perf_counter()
    run_dir = train_centralized(pcfg, progress=False, dataset=public)
    cost = {"images": len(public), "steps": pcfg.train.steps, "batch": pcfg.train.batch_size, "lr": pcfg.train.lr,
            "passes": pcfg.train.steps * pcfg.train.batch_size * pcfg.diffusion.noise_multiplicity,
            "seconds": round(time.perf_counter() - t0, 1)}
    return run_dir / "checkpoints" / "last.pt", manifest_path, cost


def run_arm(arm: str, cfg, work: Path, manifest_path: Path) -> tuple[Path, float]:
    """Simulate one arm; checks that its sites hold exactly the records of the shared split."""
    from sim.processes import free_port
    from sim.run import simulate

    start = time.perf_counter()
    run_dir = simulate(cfg, run_dir=work / arm, flwr_home=work / "flwr_home", timeout=7200, http_port=free_port(),
                       control_port=free_port(), log_path=work / f"{arm}.flower.log")
    shared, own = (json.loads(p.read_text()) for p in (manifest_path, run_dir / "manifest.json"))
    if (shared["sites"], shared["public"]) != (own["sites"], own["public"]):
        raise RuntimeError(f"{arm}: its split differs from the shared one in {manifest_path}")
    return run_dir, time.perf_counter() - start


def evaluate(ckpt: Path, out_dir: Path, encoder: Path, manifest_path: Path, samples: int) -> dict:
    from meddiff.recipes.evaluation import evaluate_checkpoint

    r = evaluate_checkpoint(ckpt, out_dir=out_dir, encoder="domain", encoder_weights=str(encoder), num_samples=samples,
                            progress=False)
    mia = members_mia(ckpt, manifest_path, 256)
    per_site = [v["mia_auc"] for v in r.get("membership_inference_per_site", {}).values()]
    return {"fid": r["fid"], "precision": r["precision"], "recall": r["recall"], "tstr": r["utility"]["tstr_accuracy"],
            "trtr": r["utility"]["trtr_accuracy"], "mia_auc": mia["mia_auc"], "mia_tpr_at_1pct_fpr": mia["mia_tpr_at_1pct_fpr"],
            "mia_auc_own_site_mean": sum(per_site) / len(per_site) if per_site else None,
            "near_duplicates": r["memorization"]["near_duplicates"]}


def arm_record(cfg, run_dir: Path, train_s: float) -> dict:
    """What the run itself tells: epsilon spent, bytes of a reply, step time, compute."""
    summary = json.loads((run_dir / "summary.json").read_text())
    eps = summary.get("epsilon", {})
    return {**plan(cfg), "epsilon_spent_max": max(eps.values()) if eps else None,
            "bytes_per_site_per_round": reply_bytes(cfg), **site_step_seconds(run_dir), "train_seconds": round(train_s, 1),
            "status": summary.get("status")}


def targets(rows: dict) -> dict:
    """The benchmark's targets at epsilon 10, each with its measured value and met / missed."""
    np_row, scratch = rows.get("nonprivate"), rows.get("dp_scratch")
    dp10 = {a: r for a, r in rows.items() if r.get("epsilon_target") == 10.0}
    if not np_row or not dp10:
        return {}
    best = min(dp10, key=lambda a: dp10[a]["fid"])
    b = dp10[best]
    out = {"best_dp_arm_eps10": best,
           "fid_vs_nonprivate <= 1.3": _target(b["fid"] / np_row["fid"], 1.3),
           "tstr_gap_to_nonprivate <= 0.05": _target(np_row["tstr"] - b["tstr"], 0.05),
           "mia_auc <= 0.55": _target(b["mia_auc"], 0.55)}
    if scratch:
        out["fid_vs_dp_scratch <= 0.5"] = _target(b["fid"] / scratch["fid"], 0.5)
    if "dp_pretrained_peft" in rows and "dp_pretrained_full" in rows:
        ratio = rows["dp_pretrained_peft"]["bytes_per_site_per_round"] / rows["dp_pretrained_full"]["bytes_per_site_per_round"]
        out["peft_bytes_vs_full <= 0.25"] = _target(ratio, 0.25)
    return out


def _target(value: float, limit: float) -> dict:
    return {"value": round(value, 4), "limit": limit, "met": bool(value <= limit)}


def markdown(rows: dict) -> str:
    head = ("| arm | epsilon | trains | domain-FID | precision | recall | TSTR | TRTR | MIA AUC (sites) | MIA AUC (own site) "
            "| bytes/site/round | step (s) | site steps x batch x K |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for arm, r in rows.items():
        compute = f"{r['site_steps']} x {r['batch']} x {r['noise_multiplicity']}" if "site_steps" in r else "-"
        lines.append(f"| {arm} | {fmt(r.get('epsilon_spent_max'), '.2f')} | {r.get('trainable', '-')} | {r['fid']:.2f} "
                     f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['tstr']:.3f} | {r['trtr']:.3f} | {r['mia_auc']:.3f} "
                     f"| {fmt(r.get('mia_auc_own_site_mean'), '.3f')} | {fmt(r.get('bytes_per_site_per_round'), ',')} "
                     f"| {fmt(r.get('step_s'), '.3f')} | {compute} |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=256,
                    help="compute per site, in steps of configs/default.yaml (batch 16, K = 1); every arm gets the same")
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="public pre-training steps (default: configs/dp.yaml's, 400)")
    ap.add_argument("--samples", type=int, default=256, help="generated images per evaluation")
    ap.add_argument("--encoder-steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of this process (pre-training, evaluation, which run while no site trains); "
                         "0 = torch's default, every core")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dp_quality")
    ap.add_argument("--work", type=Path, default=None, help="run directories (default: runs/dp_quality-<time>)")
    return ap.parse_args()


def run_arms(args: argparse.Namespace, data: Path, work: Path, public_ckpt: Path, manifest_path: Path, encoder: Path,
             rows: dict, grids: dict) -> None:
    """Train and evaluate every arm of ``--arms`` in order, into ``rows`` and ``grids``."""
    modes = {"dp_pretrained_full": [], "dp_pretrained_peft": PEFT}
    for arm in [a for a in args.arms.split(",") if a]:
        extra = []
        if arm == "dp_pretrained_eps1":  # the fine-tuning mode that reached the lower FID at epsilon 10
            tried = [a for a in modes if a in rows]
            extra = modes[min(tried, key=lambda a: rows[a]["fid"])] if tried else []
        cfg = arm_config(arm, extra, args.steps, base_overrides(data, work, arm), public_ckpt)
        run_dir, train_s = run_arm(arm, cfg, work, manifest_path)
        rows[arm] = {**arm_record(cfg, run_dir, train_s),
                     **evaluate(run_dir / "checkpoints" / "last.pt", run_dir / "eval", encoder, manifest_path, args.samples)}
        r = rows[arm]
        label = f"{arm}\n(epsilon {r['epsilon_target'] or 'inf'}, {r['trainable']})"
        grids[label] = sorted((run_dir / "samples").glob("*.png"))[-1]
        print(f"[dp_quality] {arm}: {json.dumps(r)}", flush=True)
        (work / "rows.json").write_text(json.dumps({"rows": rows, "grids": {k: str(v) for k, v in grids.items()}}, indent=2))


def main() -> None:
    args = parse_args()
    if not args.data.is_file():
        sys.exit(f"PneumoniaMNIST not found at {args.data}; pass --data path/to/pneumoniamnist.npz")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import torch

    from configs import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    data, out = args.data.resolve(), args.out.resolve()
    work = (args.work or REPO / "runs" / f"dp_quality-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    encoder = domain_encoder(load_config(None, base_overrides(data, work, "encoder")), f"pneumoniamnist:{data.name}",
                             work / "domain_encoder.pt", steps=args.encoder_steps)
    public_ckpt, manifest_path, pre_cost = pretrain(data, work, args.pretrain_steps)
    (work / "pretraining.json").write_text(json.dumps(pre_cost))
    rows = {"public_pretrained": evaluate(public_ckpt, public_ckpt.parent.parent / "eval", encoder, manifest_path,
                                          args.samples)}
    print(f"[dp_quality] public_pretrained: {json.dumps(rows['public_pretrained'])}", flush=True)
    grids = {"public pre-training only\n(no site data)": sorted((public_ckpt.parent.parent / "samples").glob("*.png"))[-1]}
    run_arms(args, data, work, public_ckpt, manifest_path, encoder, rows, grids)
    result = report(args, rows, pre_cost, work, time.perf_counter() - t0)
    (out / "dp_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "dp_quality.md").write_text(markdown(rows))
    side_by_side(grids, out / "side_by_side.png", title="PneumoniaMNIST: final sample grids of each arm")
    print(json.dumps(result, indent=2))


def report(args: argparse.Namespace, rows: dict, pre_cost: dict, work: Path, seconds: float) -> dict:
    import torch

    ratios = {}
    for ref in ("nonprivate", "dp_scratch"):
        if ref in rows:
            ratios[f"fid_vs_{ref}"] = {a: round(r["fid"] / rows[ref]["fid"], 3) for a, r in rows.items()}
            ratios[f"tstr_minus_{ref}"] = {a: round(r["tstr"] - rows[ref]["tstr"], 3) for a, r in rows.items()}
    return {"benchmark": "dp_quality", "data": str(args.data), "compute_steps": args.steps, "samples": args.samples,
            "setup": {"sites": SITES, "public_fraction": PUBLIC_FRACTION, "dp_recipe": "configs/dp.yaml",
                      "nonprivate": "configs/default.yaml", "threads": torch.get_num_threads(), "torch": torch.__version__},
            "pretraining": pre_cost, "arms": rows, "ratios": ratios, "targets": targets(rows), "work_dir": str(work),
            "total_seconds": round(seconds, 1)}


if __name__ == "__main__":
    main()
