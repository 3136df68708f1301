"""Segmentation utility of federated mask-conditioned synthesis: do the generated (image, mask)
pairs train a segmenter that works on real images?

Data (``--data``): the embedded phantoms (2-D, ``--size`` pixels), or the template brain cohort
(``meddiff data from-template`` on the MNI152 T1 of ``../shared/data``, every patient with a
tumour, its T2-like sequence by default: ``--sequence``) as 2-D slices (``template``) or whole
volumes at ``--size`` cubed (``template3d``). The federated sites train on one cohort; the
segmenters train and test on a second cohort of other patients (an 80/20 split by patient), so no
test patient was seen by the generator. The sites share the segmenters' scanner
(``partition.scanner_shift=false``), so every arm is scored on the population its training pairs
came from; ``--scanner-shift`` gives each site its own scanner instead (a cross-scanner test for the
synthetic pairs only).
3 federated sites (``meddiff simulate``), arms:

- ``nonprivate``: the mask-conditioned denoiser of ``configs/default.yaml``, without DP;
- ``dp``: the same under site DP-SGD at epsilon 10 per site (``--epsilon``);
- ``lesion``: non-private with the lesion-weighted loss (``train.lesion_weight=5``, dilation 1);
- ``anatomy``: non-private with the anatomy constraint (a segmenter trained on real phantom pairs
  first, ``train.anatomy_weight=0.5``).

Each final checkpoint generates one image per held-out bank mask, then ``evaluate_segmentation``
(``meddiff evaluate --task segmentation``) trains MONAI U-Net segmenters on real, synthetic and
real + synthetic pairs and scores them on real held-out phantoms, with all the real pairs and with
10% of them (the same generated pairs rescored), plus mask fidelity. Targets: mask fidelity Dice
>= 0.75; synthetic-only Dice >= 0.9 x real-only; real + synthetic >= real-only at 10% real data.

    python bench/segmentation_utility.py [--data phantoms|template|template3d] [--arms nonprivate,dp,lesion,anatomy]
        [--size 32] [--samples 256] [--guidance-scale 1.0] [--scanner-shift] [--reuse]

Prints one JSON object and writes it with a Markdown table to ``--out``.
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
ARMS = {
    "nonprivate": [],
    "dp": ["privacy.enabled=true"],
    "lesion": ["train.lesion_weight=5", "train.lesion_dilation=1"],
    "anatomy": ["train.anatomy_weight=0.5"],  # + the segmenter file
}
REGION = "whole_tumour"
TEMPLATE = REPO.parent / "shared" / "data" / "mni152_t1_1mm.nii.gz"
DATA = ("phantoms", "template", "template3d")
SAMPLES = 256


def data_overrides(args: argparse.Namespace, work: Path) -> tuple[list[str], Path | None]:
    """The overrides that select ``--data``, and the cohort the segmenters use (None: the phantoms' own held-out stream)."""
    if args.data == "phantoms":
        return [f"data.image_size={args.size}"], None
    from meddiff.data.template import write_template_cohort

    if not TEMPLATE.is_file():
        sys.exit(f"--data {args.data} needs the MNI152 template at {TEMPLATE}, which is absent")
    for name, seed, num in (("cohort", 0, args.patients), ("eval_cohort", 1, args.eval_patients)):
        if not (work / name).is_dir():
            write_template_cohort(TEMPLATE, work / name, num_patients=num, spacing=args.spacing, lesion_fraction=1.0, seed=seed,
                                  t2w=args.sequence == "t2w")
    overrides = ["data.dataset=brats", f"data.path={work / 'cohort'}", f"data.cache_dir={work / 'cache'}",
                 f"data.image_size={args.size}", f"data.sequence={args.sequence}"]
    overrides += ["model.spatial_dims=3"] if args.data == "template3d" else []
    return overrides, work / "eval_cohort"


def base_overrides(args: argparse.Namespace, work: Path, name: str) -> list[str]:
    return ["model.cond_channels=4", "model.num_classes=2", f"model.attention_resolutions=[{args.size // 4}]",  # coarsest level
            f"partition.scanner_shift={str(args.scanner_shift).lower()}", *args.data_overrides, f"output.root={work}",
            f"output.name={name}", f"federation.num_rounds={args.rounds}", f"federation.local_steps={args.local_steps}",
            f"privacy.target_epsilon={args.epsilon}"]


def anatomy_segmenter(args: argparse.Namespace, work: Path) -> Path:
    """A segmenter trained on real phantom pairs (the training stream, none of the test set)."""
    from configs import load_config
    from meddiff.evaluate.segmentation import SegmenterSettings, save_segmenter, train_segmenter
    from meddiff.recipes.segmentation import real_mask_pairs

    cfg = load_config(REPO / "configs" / "default.yaml", base_overrides(args, work, "segmenter"))
    (images, masks), _ = real_mask_pairs(cfg, num_test=1)  # the federation's own cohort
    return save_segmenter(work / "anatomy_segmenter.pt", train_segmenter(images, masks, settings=SegmenterSettings(steps=args.seg_steps)))


def site_scanner_real_only(args: argparse.Namespace, work: Path) -> float:
    """Whole-tumour Dice on the default scanner's held-out phantoms of a segmenter trained on the real
    pairs the sites hold, each under its own scanner: the real counterpart of the synthetic-only arm
    under ``--scanner-shift``."""
    import torch

    from configs import load_config
    from meddiff.evaluate.segmentation import SegmenterSettings, evaluate_segmenter, train_segmenter
    from meddiff.recipes.segmentation import real_mask_pairs
    from meddiff.recipes.site_segmentation import site_pairs
    from meddiff.recipes.sites import phantom_site

    cfg = load_config(REPO / "configs" / "default.yaml", base_overrides(args, work, "site_scanners"))
    _, test = real_mask_pairs(cfg, num_test=256)
    sites = [site_pairs(phantom_site(s, cfg.federation.num_sites, cfg), cfg)[0] for s in range(cfg.federation.num_sites)]
    images, masks = (torch.cat(parts) for parts in zip(*sites))
    segmenter = train_segmenter(images, masks, settings=SegmenterSettings(steps=args.seg_steps))
    return evaluate_segmenter(segmenter, *test)[REGION]["dice"]


def run_arm(arm: str, args: argparse.Namespace, work: Path) -> dict:
    """Train one arm federated (unless ``--reuse`` finds it trained), then score its generated pairs
    with all and with 10% of the real pairs. ``train_seconds`` sums the run's rounds."""
    from configs import load_config
    from meddiff.recipes.segmentation import evaluate_segmentation
    from sim.processes import free_port
    from sim.run import simulate

    run_dir = work / arm
    if not (args.reuse and (run_dir / "checkpoints" / "last.pt").is_file()):
        extra = ARMS[arm] + ([f"train.anatomy_segmenter={anatomy_segmenter(args, work)}"] if arm == "anatomy" else [])
        cfg = load_config(REPO / "configs" / "default.yaml", base_overrides(args, work, arm) + extra)
        simulate(cfg, run_dir=run_dir, flwr_home=work / "flwr_home", timeout=7200, http_port=free_port(),
                 control_port=free_port(), log_path=work / f"{arm}.flower.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    epsilons = [r["max_epsilon"] for r in summary["rounds"] if r.get("max_epsilon") not in (None, float("inf"))]
    suffix = ("" if args.guidance_scale is None else f"_guidance{args.guidance_scale:g}") + \
        ("" if args.samples == SAMPLES else f"_n{args.samples}")  # each setting keeps its own generated pairs
    ckpt, out = run_dir / "checkpoints" / "last.pt", run_dir / f"eval{suffix}"
    common = dict(steps=args.seg_steps, num_samples=args.samples, progress=False,
                  data_path=str(args.eval_cohort) if args.eval_cohort else None)
    pairs = out / "all_real" / "generated_pairs.npz"
    kept = dict(synthetic=pairs) if args.reuse and pairs.is_file() else dict(guidance_scale=args.guidance_scale)
    full = evaluate_segmentation(checkpoint=ckpt, out_dir=out / "all_real", **kept, **common)
    scarce = evaluate_segmentation(checkpoint=ckpt, synthetic=pairs, out_dir=out / "real_10pct", real_fraction=0.1, **common)
    dice = lambda r, a: r["arms"][a][REGION]["dice"]  # noqa: E731
    return {"train_seconds": round(sum(r["seconds"] for r in summary["rounds"]), 1), "status": summary.get("status"),
            "epsilon_max": max(epsilons) if epsilons else None,
            "all_real": {a: dice(full, a) for a in full["arms"]}, "real_10pct": {a: dice(scarce, a) for a in scarce["arms"]},
            "mask_fidelity": full["mask_fidelity"][REGION]["dice"],
            "mask_fidelity_per_region": {k: v["dice"] for k, v in full["mask_fidelity"].items()},
            "num_real_train": full["num_real_train"], "num_real_test": full["num_real_test"]}


def targets(row: dict) -> dict:
    real, syn = row["all_real"]["real_only"], row["all_real"]["synthetic_only"]
    scarce = row["real_10pct"]
    met = lambda a, b: a is not None and b is not None and a >= b  # noqa: E731  (None: no tumour to score)
    return {"mask_fidelity >= 0.75": met(row["mask_fidelity"], 0.75),
            "synthetic_only >= 0.9 x real_only": met(syn, None if real is None else 0.9 * real),
            "real_plus_synthetic >= real_only at 10% real": met(scarce["real_plus_synthetic"], scarce["real_only"])}


def markdown(rows: dict) -> str:
    lines = ["| arm | epsilon | real only | synthetic only | real + synthetic | real only (10%) | real + synthetic (10%) "
             "| mask fidelity |", "| --- " * 8 + "|"]
    for arm, r in rows.items():
        a, s = r["all_real"], r["real_10pct"]
        eps = "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.2f}"
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {arm} | {eps} | {f(a['real_only'])} | {f(a['synthetic_only'])} | {f(a['real_plus_synthetic'])} "
                     f"| {f(s['real_only'])} | {f(s['real_plus_synthetic'])} | {f(r['mask_fidelity'])} |")
    return "\n".join(lines) + "\n\nWhole-tumour Dice on real held-out pairs.\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="nonprivate,dp,lesion,anatomy")
    ap.add_argument("--data", choices=DATA, default="phantoms")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (template3d: volume side in voxels)")
    ap.add_argument("--patients", type=int, default=30, help="template patients the sites train on")
    ap.add_argument("--eval-patients", type=int, default=20, help="other template patients the segmenters train and test on")
    ap.add_argument("--spacing", type=float, default=6.0, help="template cohort voxel spacing in mm")
    ap.add_argument("--sequence", choices=("t2w", "t1c", "t1n"), default="t2w",
                    help="template sequence the images are (t2w: bright oedema, so the whole tumour shows, as on BraTS "
                         "T2/FLAIR; on t1c only the enhancing rim stands out)")
    ap.add_argument("--scanner-shift", action="store_true",
                    help="give each site its own scanner effects; the segmenters' real pairs keep the default scanner, so "
                         "synthetic pairs are then scored across a scanner shift that the real-only arm does not face")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=60)
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument("--samples", type=int, default=SAMPLES, help="generated pairs per arm")
    ap.add_argument("--seg-steps", type=int, default=1000, help="steps of every segmenter")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="mask classifier-free guidance of the generated pairs (default: the config's, 1.0)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "segmentation_utility")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="keep the arms already trained in --work (and their generated "
                    "pairs) and only rescore them, e.g. with other --seg-steps")
    args = ap.parse_args()
    for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
        os.environ.setdefault(key, value)
    work = (args.work or REPO / "runs" / f"segmentation_utility-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_overrides, args.eval_cohort = data_overrides(args, work)
    t0, rows = time.perf_counter(), {}
    reference = site_scanner_real_only(args, work) if args.scanner_shift and args.data == "phantoms" else None
    if reference is not None:
        print(f"[segmentation_utility] real only, trained on the sites' scanners: {reference:.3f}", flush=True)
    for arm in [a for a in args.arms.split(",") if a]:
        if arm not in ARMS:
            sys.exit(f"unknown arm {arm!r}; expected some of {', '.join(ARMS)}")
        rows[arm] = run_arm(arm, args, work)
        rows[arm]["targets"] = targets(rows[arm])
        print(f"[segmentation_utility] {arm}: {json.dumps(rows[arm])}", flush=True)
    data = f"{args.data} {args.size}^{3 if args.data == 'template3d' else 2}" + ("" if args.data == "phantoms" else f" {args.sequence}")
    result = {"benchmark": "segmentation_utility", "data": data, "sites": 3, "scanner_shift": args.scanner_shift,
              "rounds": args.rounds, "local_steps": args.local_steps, "guidance_scale": 1.0 if args.guidance_scale is None else args.guidance_scale,
              "region": REGION, "arms": rows,
              "real_only_site_scanners": reference,
              "work_dir": str(work), "total_seconds": round(time.perf_counter() - t0, 1)}
    (args.out / "segmentation_utility.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "segmentation_utility.md").write_text(markdown(rows))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
