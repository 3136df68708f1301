"""Run directories: every run carries the resolved config that produced it, and a metrics CSV."""

from __future__ import annotations

import csv
import datetime as _dt
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import meddiff
from configs import ExperimentConfig, OutputConfig, config_to_yaml


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
    """Append-only CSV with a fixed header; each row is flushed at once (a crash loses nothing)."""

    def __init__(self, path: str | Path, fieldnames: Sequence[str]):
        self.path = Path(path)
        self.fieldnames = list(fieldnames)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fh = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fieldnames, extrasaction="ignore")
        if new:
            self._writer.writeheader()
            self._fh.flush()

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
