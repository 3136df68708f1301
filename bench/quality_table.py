"""The quality / utility / privacy-leakage table on PneumoniaMNIST (real chest X-rays, 28x28).

Four arms with the same compute budget (total optimizer steps at logical batch 32):

- ``centralized``: ``meddiff train`` on the whole training split, without DP;
- ``federated_iid``: 3 pseudo-sites, IID split, FedAvg;
- ``federated_dirichlet``: 3 pseudo-sites, Dirichlet label skew alpha = 0.3;
- ``federated_dp``: IID split, DP-SGD at every site with a per-site budget epsilon = 10.

Each checkpoint (EMA weights) is evaluated by ``meddiff.recipes.evaluation.evaluate_checkpoint`` with
one domain encoder trained once on the real training split: domain-FID, precision/recall, TSTR
against TRTR, membership-inference AUC and memorization flags. Pseudo-sites get no scanner shift
and nothing is held out of the training split, so every arm sees the same images and the MIA
members are exactly the training records.

    python bench/quality_table.py [--data ../shared/data/pneumoniamnist.npz] [--steps 600] [--out bench/results/quality]

``--steps`` sets the budget (centralized steps = rounds x local steps x sites of the federated
arms); raise it, and ``--samples``, on a GPU. Prints one JSON object and writes it, with a
Markdown table, under ``--out``.
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"
SITES, ROUNDS = 3, 4


def base_overrides(data: Path, out: Path, name: str) -> list[str]:
    return [
        "data.dataset=medmnist", f"data.path={data}", "data.image_size=28", "model.num_classes=2",
        "model.model_channels=32", "model.channel_mult=[1,2,2]", "model.attention_resolutions=[7]",
        "model.num_head_channels=32", "train.batch_size=32", "train.lr=1e-3", "train.threads=0",
        "sampler.num_inference_steps=50", "output.num_samples=16", f"output.root={out}", f"output.name={name}",
        "partition.scanner_shift=false", "partition.test_fraction=0.0", "partition.site_test_fraction=0.05",
        f"federation.num_sites={SITES}", f"federation.min_train_nodes={SITES}",
    ]


def run_arm(arm: str, data: Path, out: Path, steps: int) -> Path:
    """Train one arm; returns its final checkpoint."""
    from configs import load_config

    local = max(1, steps // (SITES * ROUNDS))
    overrides = base_overrides(data, out, arm)
    if arm == "centralized":
        from meddiff.recipes.centralized import train_centralized

        overrides += [f"train.steps={steps}", "train.log_every=50", f"output.checkpoint_every={steps}"]
        return train_centralized(load_config(None, overrides), progress=False) / "checkpoints" / "last.pt"
    from sim.run import simulate

    overrides += [f"federation.num_rounds={ROUNDS}", f"federation.local_steps={local}"]
    overrides += {"federated_iid": ["partition.scheme=iid"],
                  "federated_dirichlet": ["partition.scheme=dirichlet", "partition.dirichlet_alpha=0.3"],
                  "federated_dp": ["partition.scheme=iid", "privacy.enabled=true", "privacy.target_epsilon=10",
                                   "privacy.grad_sample_mode=vmap"]}[arm]
    run_dir = simulate(load_config(None, overrides), run_dir=out / arm,
                       flwr_home=out / "flwr_home", timeout=7200, log_path=out / f"{arm}.flower.log")
    return run_dir / "checkpoints" / "last.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=600, help="total optimizer steps per arm")
    ap.add_argument("--samples", type=int, default=256, help="generated images per evaluation")
    ap.add_argument("--encoder-steps", type=int, default=600)
    ap.add_argument("--arms", default="centralized,federated_iid,federated_dirichlet,federated_dp")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality")
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"PneumoniaMNIST not found at {args.data}; pass --data path/to/pneumoniamnist.npz")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    from bench.common import domain_encoder
    from configs import load_config
    from meddiff.recipes.evaluation import evaluate_checkpoint

    t0 = time.perf_counter()
    cfg = load_config(None, base_overrides(args.data, out, "encoder"))
    encoder_path = domain_encoder(cfg, f"pneumoniamnist:{args.data.name}", out / "domain_encoder.pt", steps=args.encoder_steps)

    rows = {}
    for arm in [a for a in args.arms.split(",") if a]:
        start = time.perf_counter()
        ckpt = run_arm(arm, args.data.resolve(), out, args.steps)
        train_s = time.perf_counter() - start
        report = evaluate_checkpoint(ckpt, out_dir=out / arm / "eval", encoder="domain", encoder_weights=str(encoder_path),
                                     num_samples=args.samples, progress=False)
        eps = None
        if arm == "federated_dp":
            summary = json.loads((out / arm / "summary.json").read_text())
            eps = max(summary.get("epsilon", {}).values(), default=None)
        rows[arm] = {"fid": report["fid"], "precision": report["precision"], "recall": report["recall"],
                     "tstr": report["utility"]["tstr_accuracy"], "trtr": report["utility"]["trtr_accuracy"],
                     "mia_auc": report["membership_inference"]["mia_auc"],
                     "mia_tpr_at_1pct_fpr": report["membership_inference"]["mia_tpr_at_1pct_fpr"],
                     "near_duplicates": report["memorization"]["near_duplicates"], "epsilon": eps,
                     "train_seconds": round(train_s, 1)}
        print(f"[quality] {arm}: {json.dumps(rows[arm])}", flush=True)
    central = rows.get("centralized", {}).get("fid")
    result = {"benchmark": "quality_table", "data": str(args.data), "steps_per_arm": args.steps, "samples": args.samples,
              "encoder": str(encoder_path), "rows": rows,
              "fid_ratio_to_centralized": {a: r["fid"] / central for a, r in rows.items()} if central else {},
              "targets": {"federated_iid": "<= 1.2x centralized FID", "federated_dirichlet": "<= 1.75x",
                          "federated_dp": "MIA AUC <= 0.55"},
              "total_seconds": round(time.perf_counter() - t0, 1)}
    (out / "quality_table.json").write_text(json.dumps(result, indent=2))
    (out / "quality_table.md").write_text(markdown_table(rows, central))
    print(json.dumps(result, indent=2))


def markdown_table(rows: dict, central) -> str:
    lines = ["| arm | domain-FID | vs centralized | precision | recall | TSTR | TRTR | MIA AUC | TPR@1%FPR | near-dup. | epsilon |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, r in rows.items():
        ratio = f"{r['fid'] / central:.2f}x" if central else "n/a"
        lines.append(f"| {arm} | {r['fid']:.2f} | {ratio} | {r['precision']:.3f} | {r['recall']:.3f} | {r['tstr']:.3f} | "
                     f"{r['trtr']:.3f} | {r['mia_auc']:.3f} | {r['mia_tpr_at_1pct_fpr']:.3f} | {r['near_duplicates']} | "
                     f"{'-' if r['epsilon'] is None else format(r['epsilon'], '.2f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
