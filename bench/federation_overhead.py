"""Federation overhead of the default experiment, and bytes on the wire per site per round.

Runs the default experiment (3 phantom sites, 5 rounds; override with section.key=value
arguments) on Flower's local simulation engine and compares, within that one run:

- the wall time of the whole simulation (SuperLink start, app install, every round, evaluation,
  checkpoints, final sampling, shutdown), against
- the sum over sites and rounds of the sites' pure local training time (``seconds`` in each
  site's reply, measured around the local training loop).

``overhead = wall / sum(local) - 1``. Three sites share 2 cores, so two train in parallel: the
ratio can fall below 1 even though Flower adds work. Also reports the bytes of one site's update
(the ArrayRecord's array payload) in fp32 and fp16 transport. Prints one JSON object.

    python bench/federation_overhead.py [section.key=value ...]
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import state_to_arrays  # noqa: E402
from configs import load_config  # noqa: E402
from meddiff.recipes.build import build_unet_from_section  # noqa: E402
from sim.processes import free_port  # noqa: E402
from sim.run import simulate  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def payload_bytes(record) -> int:
    return sum(len(arr.data) for arr in record.values())


def main() -> None:
    overrides = sys.argv[1:]
    cfg = load_config(CONFIG, overrides)
    model = build_unet_from_section(cfg.model, cfg.data.image_size)
    sizes = {dt: payload_bytes(state_to_arrays(model.state_dict(), dt)) for dt in ("fp32", "fp16")}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = simulate(cfg, run_dir=Path(tmp) / "run", flwr_home=Path(tmp) / "flwr_home",
                       http_port=free_port(), control_port=free_port(), log_path=Path(tmp) / "flwr.log")
        wall = time.perf_counter() - t0
        rows = list(csv.DictReader(open(run / "metrics.csv")))
    site_train = sum(float(r["seconds"]) for r in rows if r["scope"].startswith("site_") and r["steps"])
    rounds = [r for r in rows if r["scope"] == "global"]
    round_wall = sum(float(r["seconds"]) for r in rounds)
    print(json.dumps({
        "benchmark": "federation_overhead",
        "sites": cfg.federation.num_sites,
        "rounds": cfg.federation.num_rounds,
        "local_steps": cfg.federation.local_steps,
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "wall_s": round(wall, 1),
        "rounds_wall_s": round(round_wall, 1),
        "sum_site_local_training_s": round(site_train, 1),
        "wall_over_local_training": round(wall / site_train, 3),
        "overhead": round(wall / site_train - 1, 3),
        "rounds_only_over_local_training": round(round_wall / site_train, 3),
        "target_overhead": 0.15,
        "update_bytes_per_site_per_round": sizes,
        "fp16_over_fp32_bytes": round(sizes["fp16"] / sizes["fp32"], 3),
        "final_held_out_loss": float(rounds[-1]["eval_loss"]),
    }, indent=2))


if __name__ == "__main__":
    main()
