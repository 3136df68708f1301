"""The meddiff-fl ServerApp: a thin adapter over :func:`server.federation.run_federation`.

Run config (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``):

- ``config-path``: experiment YAML ("" = the packaged ``configs/default.yaml``);
- ``overrides``: space-separated ``section.key=value`` overrides;
- ``run-dir``: absolute output folder ("" = ``<FLWR_HOME>/../runs/federated-<timestamp>``);
- ``resume-from``: a round checkpoint to continue from;
- ``manifest-path``: a split manifest for the sites (simulation of real datasets).
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import configs
from configs import load_config
from server.federation import run_federation

app = ServerApp()


def resolve_run(run_config: dict) -> tuple:
    """(config, absolute run dir) from the run config."""
    path = str(run_config.get("config-path", "")) or str(Path(configs.__file__).parent / "default.yaml")
    cfg = load_config(path, shlex.split(str(run_config.get("overrides", ""))))
    run_dir = str(run_config.get("run-dir", ""))
    if not run_dir:
        home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).resolve()
        name = cfg.output.name or f"federated-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        run_dir = str(home.parent / "runs" / name)
    if not Path(run_dir).is_absolute():
        raise ValueError(f"run-dir must be an absolute path (the ServerApp's working directory is not the project's): {run_dir}")
    return cfg, Path(run_dir)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, run_dir = resolve_run(dict(context.run_config))
    run_federation(grid, cfg, run_dir=run_dir, resume_from=str(context.run_config.get("resume-from", "")),
                   manifest_path=str(context.run_config.get("manifest-path", "")))
