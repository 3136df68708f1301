"""Run directories: every run carries the resolved config that produced it, and a metrics CSV."""

from __future__ import annotations

import csv
import datetime as _dt
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import meddiff
from configs import ExperimentConfig, OutputConfig, config_to_yaml
from meddiff.recipes.phases import phase_named


def create_run_dir(output_cfg: OutputConfig, config: ExperimentConfig, *, kind: str) -> Path:
    """Create ``<root>/<name>`` (``<name>`` defaults to ``<kind>-<timestamp>``) and write ``config.yaml``.

    Returns the absolute path. An existing directory is reused only if it holds the same config,
    so a second run never silently mixes its outputs with another experiment's.
    """
    name = output_cfg.name or f"{kind}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = (Path(output_cfg.root) / name).resolve()
    text = config_to_yaml(config)
    cfg_file = run_dir / "config.yaml"
    if cfg_file.exists() and cfg_file.read_text() != text:
        raise FileExistsError(
            f"{run_dir} already holds a run with a different config; choose another output.name or delete it"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(text)
    (run_dir / "meta.json").write_text(
        json.dumps({"version": meddiff.__version__, "kind": kind, "created": _dt.datetime.now().isoformat()}, indent=2)
    )
    return run_dir


class MetricsCSV:
    """Append-only CSV with a fixed header; each row is flushed at once (a crash loses nothing). A
    file written with fewer columns (a run resumed by a newer version) is rewritten once with the
    new header, its rows kept, the new columns empty."""

    def __init__(self, path: str | Path, fieldnames: Sequence[str]):
        self.path = Path(path)
        self.fieldnames = list(fieldnames)
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            self._widen()
        self._fh = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fieldnames, extrasaction="ignore")
        if new:
            self._writer.writeheader()
            self._fh.flush()

    def _widen(self) -> None:
        with open(self.path, newline="") as fh:
            reader = csv.DictReader(fh)
            old, rows = list(reader.fieldnames or []), list(reader)
        if old == self.fieldnames or not set(old) < set(self.fieldnames):
            return  # the same header, or another file's: left as it is
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: Mapping[str, Any]) -> None:
        self._writer.writerow({k: _fmt(row.get(k, "")) for k in self.fieldnames})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _floats(rows, key):
    out = []
    for r in rows:
        try:
            out.append((int(r["round"]), float(r[key])))
        except (KeyError, TypeError, ValueError):
            continue
    return [(x, y) for x, y in out if y == y and abs(y) != float("inf")]


def plot_run(run_dir: str | Path) -> Path:
    """``<run>/plots.png``: global train and held-out loss, each site's epsilon, the autoencoder's
    losses (phase 1 of latent diffusion) and, when the run evaluated it, FID against round (from
    ``metrics.csv``)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a federated run directory?")
    rows = list(csv.DictReader(open(path)))
    if not rows or "round" not in rows[0]:
        raise ValueError(f"{path} has no per-round rows (a centralized run has steps, not rounds)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    earlier = [r for r in rows if not phase_named(r.get("phase")).trains_study_model and r.get("scope") == "global"]
    rows = [r for r in rows if phase_named(r.get("phase")).trains_study_model]
    glob = [r for r in rows if r.get("scope") == "global"]
    sites = sorted({r["scope"] for r in rows if r.get("scope", "").startswith("site_")})
    panels = [("loss", [("train", _floats(glob, "train_loss")), ("held-out", _floats(glob, "eval_loss"))])]
    eps = [(s, _floats([r for r in rows if r["scope"] == s and r.get("accepted") != ""], "epsilon")) for s in sites]
    if any(points for _, points in eps):
        panels.append(("epsilon", eps))
    for phase in sorted({phase_named(r["phase"]) for r in earlier}, key=lambda p: p.order):
        mine = [r for r in earlier if phase_named(r["phase"]) is phase]
        panels.append((f"{phase.name} (phase {phase.order + 1})", [("train", _floats(mine, "train_loss")),
                                                                   (phase.metric_name, _floats(mine, "eval_loss"))]))
    if any(r.get("fid") not in (None, "") for r in glob):
        panels.append(("FID", [("global", _floats(glob, "fid"))]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), dpi=120, squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, points in series:
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "plots.png"
    fig.savefig(out)
    plt.close(fig)
    return out
