"""Scaling of a simulated federation in the number of sites: wall time and memory of the whole tree.

Runs ``meddiff simulate`` as a child process for one round of a tiny study at 2, 6 and 12 sites
(then one round of the default-size model under DP at 3 sites) and samples, every 0.25 s, every
process that carries the run's private ``FLWR_HOME`` in its environment: the CLI, SuperLink,
SuperExec, the ServerApp, Ray's daemons and its actors. Memory is the proportional set size
(``Pss`` of ``/proc/<pid>/smaps_rollup``), so pages shared between Ray workers count once; the
resident size of the largest Ray actor is reported too.

- ``startup_s``: launch to the first site's first progress line (SuperLink, app install, Ray, the
  actors' imports and first step).
- ``fixed_s`` and ``s_per_site``: intercept and slope of the least-squares line of wall time
  against sites; ``s_per_site_per_core`` multiplies the slope by the cores (sites train
  ``cores`` at a time).

Prints one JSON object and writes it to ``bench/results/sites_scaling.json``.

    python bench/sites_scaling.py [--sites 2 6 12] [--skip-dp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.model_channels=8", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[]",
        "model.num_head_channels=8", "model.norm_groups=8", "data.image_size=16", "train.batch_size=8",
        "federation.num_rounds=1", "federation.local_steps=5", "federation.min_train_nodes=2",
        "simulation.parallel_sites=0", "output.num_samples=4", "sampler.num_inference_steps=5"]
DP_DEFAULT = ["privacy.enabled=true", "federation.num_rounds=1", "federation.local_steps=10"]


def _field_kib(pid: int, name: str, source: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _run_processes(mark: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _is_actor(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")
    except OSError:
        return False


class TreeSampler(threading.Thread):
    """Peak total PSS, peak process count and the largest actor's peak RSS of one run's processes."""

    def __init__(self, flwr_home: Path, period: float = 0.25):
        super().__init__(daemon=True)
        self.mark, self.period, self.done = f"FLWR_HOME={flwr_home}".encode(), period, threading.Event()
        self.peak_pss_kib = self.peak_processes = self.peak_actor_rss_kib = 0

    def run(self) -> None:
        while not self.done.is_set():
            pids = _run_processes(self.mark)
            self.peak_processes = max(self.peak_processes, len(pids))
            self.peak_pss_kib = max(self.peak_pss_kib, sum(_field_kib(p, "Pss", "smaps_rollup") for p in pids))
            actors = [_field_kib(p, "VmRSS", "status") for p in pids if _is_actor(p)]
            self.peak_actor_rss_kib = max([self.peak_actor_rss_kib, *actors])
            self.done.wait(self.period)


def run_study(sites: int, overrides: list[str], tmp: Path) -> dict:
    """One ``meddiff simulate`` run; its wall time, start-up and peak memory."""
    flwr_home = tmp / f"flwr_home_{sites}_{len(overrides)}"
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    run_dir = tmp / f"run_{sites}_{len(overrides)}"
    cmd = [str(Path(sys.executable).parent / "meddiff"), "simulate", "--config", str(ROOT / "configs" / "default.yaml"),
           "--run-dir", str(run_dir), f"federation.num_sites={sites}", f"data.num_samples={max(256, 48 * sites)}", *overrides]
    sampler = TreeSampler(flwr_home)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler.start()
    first_progress, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first_progress is None and " step " in line and "round 1/" in line:
            first_progress = time.perf_counter() - started
    code = proc.wait()
    wall = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    if code != 0:
        raise RuntimeError(f"simulate with {sites} sites exited {code}:\n{''.join(lines[-30:])}")
    return {"sites": sites, "wall_s": round(wall, 1), "startup_s": round(first_progress or float("nan"), 1),
            "peak_tree_pss_mib": round(sampler.peak_pss_kib / 1024), "peak_processes": sampler.peak_processes,
            "largest_actor_rss_mib": round(sampler.peak_actor_rss_kib / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[2, 6, 12])
    ap.add_argument("--skip-dp", action="store_true", help="leave out the default-size DP actor measurement")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tiny = [run_study(n, TINY, Path(tmp)) for n in args.sites]
        dp = None if args.skip_dp else run_study(3, DP_DEFAULT, Path(tmp))
    n = np.array([r["sites"] for r in tiny], float)
    slope, intercept = np.polyfit(n, [r["wall_s"] for r in tiny], 1) if len(tiny) > 1 else (float("nan"), float("nan"))
    mem_slope = np.polyfit(n, [r["peak_tree_pss_mib"] for r in tiny], 1)[0] if len(tiny) > 1 else float("nan")
    result = {
        "benchmark": "sites_scaling", "cores": cores, "tiny_study": tiny,
        "fixed_s": round(float(intercept), 1), "s_per_site": round(float(slope), 2),
        "s_per_site_per_core": round(float(slope) * cores, 2), "pss_mib_per_extra_site": round(float(mem_slope), 1),
        "dp_default_model_3_sites": dp,
        "targets": {"startup_s": 10, "dp_actor_rss_mib": 1536},
    }
    out = ROOT / "bench" / "results" / "sites_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
