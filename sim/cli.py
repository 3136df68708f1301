"""The full ``meddiff`` command line: the core commands plus ``meddiff data split`` and ``meddiff simulate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from configs import load_config
from meddiff import cli as core_cli


def cmd_data_split(args: argparse.Namespace) -> int:
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


def cmd_simulate(args: argparse.Namespace) -> int:
    from sim.run import simulate

    cfg = load_config(args.config, args.overrides)
    simulate(cfg, config_path=args.config, overrides=list(args.overrides), run_dir=args.run_dir,
             resume_from=str(args.resume_from or ""), timeout=args.timeout)
    return 0


def _extend(sub) -> None:
    p = sub.add_parser("simulate", help="federated training of all sites on Flower's local simulation engine")
    p.add_argument("--config", "-c", type=Path, default=None, help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--run-dir", type=Path, default=None, help="output folder (default: <output.root>/<output.name or federated-timestamp>)")
    p.add_argument("--resume-from", type=Path, default=None, help="round checkpoint to continue from")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    p.set_defaults(func=cmd_simulate)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("split", help="split a dataset into reproducible, patient-disjoint pseudo-sites")
    p.add_argument("--config", "-c", type=Path, default=None, help="experiment YAML")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <output.root>/splits/<dataset>-<scheme>-seed<seed>)")
    p.add_argument("--preview", action="store_true", help="print per-site counts by label and save a bar chart")
    p.set_defaults(func=cmd_data_split)


def main(argv: Sequence[str] | None = None) -> int:
    return core_cli.main(argv, extend=_extend)


if __name__ == "__main__":
    sys.exit(main())
