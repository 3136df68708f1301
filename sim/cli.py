"""The full ``meddiff`` command line: the core commands plus ``meddiff data split`` and ``meddiff simulate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from configs import load_config
from meddiff import cli as core_cli


def cmd_data_split(args: argparse.Namespace) -> int:
    # loaded on demand: the CLI parses arguments and answers --help without importing torch
    from sim.manifest import build_manifest, preview_chart, preview_table, write_manifest

    cfg = load_config(args.config, args.overrides)
    out = args.out or Path(cfg.output.root) / "splits" / f"{cfg.data.dataset}-{cfg.partition.scheme}-seed{cfg.partition.seed}"
    manifest = build_manifest(cfg)
    path = write_manifest(manifest, out)
    print(f"[meddiff] wrote {path} ({cfg.federation.num_sites} sites, patient-disjoint)")
    if args.preview:
        print(preview_table(manifest))
        chart = preview_chart(manifest, Path(out) / "sites.png")
        print(f"[meddiff] wrote {chart}")
    return 0


def cmd_data_from_template(args: argparse.Namespace) -> int:
    # loaded on demand: the CLI parses arguments and answers --help without importing torch
    from meddiff.data.template import write_template_cohort

    cases = write_template_cohort(args.template, args.out, num_patients=args.num_patients, spacing=args.spacing,
                                  lesion_fraction=args.lesion_fraction, seed=args.seed, t2w=args.t2w)
    files = "t1n/t1c/t2w/seg" if args.t2w else "t1n/t1c/seg"
    print(f"[meddiff] wrote {len(cases)} pseudo-patients (BraTS layout, {files} at {args.spacing:g} mm) to {args.out}")
    print(f"[meddiff] train on them with: data.dataset=brats data.path={args.out}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    # loaded on demand: the CLI parses arguments and answers --help without importing torch
    from sim.run import RunInterrupted, simulate

    flags = {"client_cpus": args.client_cpus, "client_gpus": args.client_gpus, "parallel_sites": args.parallel_sites,
             "ray_address": args.ray_address}
    overrides = list(args.overrides) + [f"simulation.{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(args.config, overrides)
    try:
        simulate(cfg, run_dir=args.run_dir,
                 resume_from=str(args.resume_from or ""), timeout=args.timeout, verbose=args.verbose)
    except RunInterrupted as exc:
        print(f"meddiff simulate: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    return 0


def cmd_privacy_report(args: argparse.Namespace) -> int:
    # loaded on demand: the CLI parses arguments and answers --help without importing torch
    from privacy.report import privacy_report, write_privacy_report

    paths = write_privacy_report(args.run_dir)
    for s in privacy_report(args.run_dir)["sites"]:
        prv = "PRV failed" if s["prv_epsilon"] is None else f"PRV {s['prv_epsilon']:.3f}{' (FLAG: >5% apart)' if s['prv_flag'] else ''}"
        print(f"[meddiff] {s['site']}: epsilon {s['epsilon']:.3f} of {s['budget']:g} (delta {s['delta']:.1e}, "
              f"{s['steps']} steps, sigma {s['noise_multiplier']}); {prv}")
    print(f"[meddiff] wrote {paths['md']}, {paths['json'].name}, {paths['png'].name}")
    return 0


def _extend(sub) -> None:
    p = sub.add_parser("simulate", help="federated training of all sites on Flower's local simulation engine")
    p.add_argument("--config", "-c", type=Path, default=None, help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--run-dir", type=Path, default=None, help="output folder (default: <output.root>/<output.name or federated-timestamp>)")
    p.add_argument("--resume-from", type=Path, default=None, help="round checkpoint to continue from")
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds before the run is stopped")
    p.add_argument("--verbose", "-v", action="store_true", help="show every Flower and Ray log line")
    p.add_argument("--client-cpus", type=float, default=None, help="CPUs per simulated site (simulation.client_cpus)")
    p.add_argument("--client-gpus", type=float, default=None, help="GPU share per site, e.g. 0.25 (simulation.client_gpus)")
    p.add_argument("--parallel-sites", type=int, default=None, help="sites training at once (simulation.parallel_sites)")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (simulation.ray_address)")
    p.set_defaults(func=cmd_simulate)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("split", help="split a dataset into reproducible, patient-disjoint pseudo-sites")
    p.add_argument("--config", "-c", type=Path, default=None, help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <output.root>/splits/<dataset>-<scheme>-seed<seed>)")
    p.add_argument("--preview", action="store_true", help="print per-site counts by label and save a bar chart")
    p.set_defaults(func=cmd_data_split)

    p = data_sub.add_parser("from-template", help="a cohort of pseudo-patient volumes (BraTS layout) made from one template NIfTI")
    p.add_argument("--template", type=Path, required=True, help="a 3-D NIfTI, e.g. the MNI152 T1 brain")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--num-patients", type=int, default=24)
    p.add_argument("--spacing", type=float, default=2.0, help="voxel size of the written volumes in mm")
    p.add_argument("--lesion-fraction", type=float, default=0.5, help="share of patients with a synthetic tumour")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t2w", action="store_true",
                   help="also write a T2-like sequence (-t2w.nii.gz, same grid) from a 3-class k-means of the T1")
    p.set_defaults(func=cmd_data_from_template)

    privacy = sub.add_parser("privacy", help="privacy tools")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True)
    p = privacy_sub.add_parser("report", help="per-site privacy-budget report of a DP run (JSON, Markdown, PNG)")
    p.add_argument("run_dir", type=Path, help="run directory of a federated run with privacy.enabled=true")
    p.set_defaults(func=cmd_privacy_report)


def main(argv: Sequence[str] | None = None) -> int:
    return core_cli.main(argv, extend=_extend)


if __name__ == "__main__":
    sys.exit(main())
