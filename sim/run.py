"""``meddiff simulate``: run an experiment on Flower's local simulation engine, end to end.

1. Check the config, the resume and the privacy plan before anything starts (:mod:`sim.preflight`);
   for real datasets write the split ``manifest.json`` into the run directory (a resume reuses
   the stored one, after checking the data still matches it).
2. Start the local simulation SuperLink ourselves (the command ``flwr run`` would start, on the
   ports Flower's ``FLWR_LOCAL_*_PORT`` variables name) so that its PID is known, and a watchdog
   (:class:`sim.processes.Reaper`) that stops the whole tree if this process dies, even by SIGKILL.
3. ``flwr run <project> local --stream`` with the run config and the simulation's resources;
   its output goes to ``<run>/flower.log`` and, filtered, to the console, with each site's
   progress (:mod:`sim.console`).
4. Stop every process started, by PID, whatever happened (SIGTERM and SIGINT included), and
   remove Ray's session directory.

Runtime dependency installation, telemetry and update checks are off, and ``FLWR_HOME`` is
project-local (``<project>/.flwr_home`` unless set), holding the shipped ``config.toml``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

from rich.console import Console

from configs import ExperimentConfig, config_to_yaml
from meddiff.recipes.pretraining import pretrain_on_public, pretrained_start
from meddiff.recipes.sites import load_manifest, verify_manifest
from sim.app_bundle import PROJECT, stage_app
from sim.console import SiteWatcher, StreamPrinter, final_table
from sim.manifest import build_manifest, dumps, write_manifest
from sim.preflight import (check_federation, check_fresh_run_dir, check_initial_weights, check_privacy_plan, check_resume,
                           site_sizes)
from sim.processes import Reaper, port_free, port_owner, stop_process_tree

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
DEFAULT_CONNECTION = """[superlink]
default = "local"

[superlink.local]
address = ":local:"
"""


class RunInterrupted(RuntimeError):
    """The user (or ``timeout``, ``kill``, ``docker stop``) stopped the run with a signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}; every Flower process of the run was stopped")
        self.signum = signum


class RunFailed(RuntimeError):
    """The federated run ended without a usable result (its ``stop_reason`` says why)."""


def flower_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def start_superlink(flwr_home: Path, env: dict[str, str], http_port: int, control_port: int) -> subprocess.Popen:
    """Start the local simulation SuperLink (as ``flwr run . local`` would) and wait for health."""
    for port in (http_port, control_port):
        if not port_free(port):
            owner = port_owner(port) or "a process this user cannot see"
            raise RuntimeError(f"port {port} on 127.0.0.1 is busy, held by {owner}; stop it, or set "
                               "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT / FLWR_LOCAL_CONTROL_API_PORT to free ports")
    runtime = flwr_home / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    cmd = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
           "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
           "--log-file", str(runtime / "superlink.log")]  # state in memory: one run per SuperLink, no SQLite locks
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; see {runtime / 'superlink.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    stop_process_tree(proc.pid)
    raise RuntimeError(f"flower-superlink did not become healthy within 120 s; see {runtime / 'superlink.log'}")


def federation_config(cfg: ExperimentConfig) -> str:
    """``--federation-config``: sites, each site's CPUs and GPU share, and how many run at once."""
    sim = cfg.simulation
    parts = [f"num-supernodes={cfg.federation.num_sites}", f"client-resources-num-cpus={sim.client_cpus:g}",
             f"client-resources-num-gpus={sim.client_gpus:g}"]
    if sim.parallel_sites and not sim.ray_address:  # a Ray cluster has its own resources
        parts.append(f"init-args-num-cpus={math.ceil(sim.parallel_sites * sim.client_cpus)}")
    return " ".join(parts)


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _manifest(cfg: ExperimentConfig, run_dir: Path, resume_from: str, say) -> tuple[str, Optional[dict]]:
    """The split manifest of a real dataset: built for a new run; reused (and checked) on resume."""
    if cfg.data.dataset == "phantoms":
        return "", None
    stored = [p for p in (run_dir / "manifest.json", Path(resume_from).resolve().parent.parent / "manifest.json")
              if resume_from and p.is_file()]
    if not stored:
        manifest = build_manifest(cfg)
        path = write_manifest(manifest, run_dir)
        say(f"[meddiff] split manifest: {path}")
        return str(path), manifest
    manifest = load_manifest(stored[0])
    added = verify_manifest(manifest, cfg)
    path = run_dir / "manifest.json"
    if stored[0] != path:
        path.write_text(dumps(manifest))
    say(f"[meddiff] resuming on the stored split {stored[0]}" + (f"; {added} record(s) added since are left out" if added else ""))
    return str(path), manifest


def simulate(cfg: ExperimentConfig, *, run_dir: Optional[Path] = None, resume_from: str = "", flwr_home: Optional[Path] = None, timeout: float = 3600.0,
             http_port: Optional[int] = None, control_port: Optional[int] = None, log_path: Optional[Path] = None,
             verbose: bool = False) -> Path:
    """Run ``cfg`` as a local Flower simulation; returns the run directory.

    The ServerApp receives ``cfg`` itself (as ``<run>/.simulate_config.yaml``), so what runs is
    exactly what was checked here.

    The full Flower log goes to ``<run>/flower.log`` (or ``log_path``, which also silences the
    console). Raises :class:`RunFailed` when the run ended without a result, and
    :class:`RunInterrupted` when a signal stopped it.
    """
    run_dir = (run_dir or Path(cfg.output.root) / (cfg.output.name or f"federated-{_dt.datetime.now():%Y%m%d-%H%M%S}")).resolve()
    console = Console(highlight=False, quiet=log_path is not None)
    say = lambda m: console.print(m, markup=False)  # noqa: E731
    cfg, manifest_path = _prepare_study(cfg, run_dir, resume_from, say, progress=log_path is None)
    flwr_home = (flwr_home or Path(os.environ.get("FLWR_HOME", PROJECT / ".flwr_home"))).resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    if not (flwr_home / "config.toml").exists():
        (flwr_home / "config.toml").write_text(DEFAULT_CONNECTION)
    http_port = http_port or int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", 39091))
    control_port = control_port or int(os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", 39093))
    env = flower_env(flwr_home, http_port, control_port)
    requested = run_dir / ".simulate_config.yaml"
    requested.write_text(config_to_yaml(cfg))
    run_config = " ".join([f"config-path={_q(str(requested))}", 'overrides=""', f"run-dir={_q(str(run_dir))}",
                           f"resume-from={_q(str(Path(resume_from).resolve()) if resume_from else '')}",
                           f"manifest-path={_q(manifest_path)}"])
    flwr_args = ["local", "--stream", "--run-config", run_config, "--federation-config", federation_config(cfg)]
    started = time.time()
    _run_flower(flwr_args, env, cfg, run_dir, flwr_home, console, timeout=timeout, log_path=log_path, verbose=verbose)
    return _outcome(run_dir, started, console, log_path or run_dir / "flower.log")


def _prepare_study(cfg: ExperimentConfig, run_dir: Path, resume_from: str, say, *, progress: bool) -> tuple[ExperimentConfig, str]:
    """Everything before Flower starts: the preflight checks, the split manifest, each site's DP
    plan and the public pre-training. Returns the config the ServerApp runs and the manifest's path."""
    check_federation(cfg)
    check_initial_weights(cfg)
    if cfg.train.init_from:  # the ServerApp runs in another working directory
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(Path(cfg.train.init_from).resolve())))
    if resume_from:
        cfg = pretrained_start(cfg, run_dir)  # the pre-training of the run's first start
        check_resume(cfg, run_dir, resume_from)
    else:
        check_fresh_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path, manifest = _manifest(cfg, run_dir, resume_from, say)
    sizes = site_sizes(cfg, manifest)
    for site, sigma in check_privacy_plan(cfg, sizes).items():
        say(f"[meddiff] DP plan: {site}, {sizes[site]} privacy units (patients or records), noise multiplier "
            f"{sigma:.3f} for epsilon {cfg.privacy.target_epsilon:g}")
    return pretrain_on_public(cfg, manifest, run_dir, say=say, progress=progress), manifest_path


def _run_flower(flwr_args: list[str], env: dict, cfg: ExperimentConfig, run_dir: Path, flwr_home: Path, console: Console, *,
                timeout: float, log_path: Optional[Path], verbose: bool) -> None:
    """Start SuperLink and ``flwr run <staged app> <flwr_args>``, stream the output, and stop
    everything, whatever happens."""
    ray_tmp = _ray_root()
    app = stage_app(ray_tmp / "app")
    env = {**env, "RAY_TMPDIR": str(ray_tmp)}
    if cfg.simulation.ray_address:
        env["RAY_ADDRESS"] = cfg.simulation.ray_address
    reaper, superlink, flwr, watcher = Reaper(folders=[ray_tmp]), None, None, None
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        superlink = start_superlink(flwr_home, env, int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]),
                                    int(env["FLWR_LOCAL_CONTROL_API_PORT"]))
        (run_dir / "flower_pids.txt").write_text(f"superlink {superlink.pid}\n")
        console.print(f"[meddiff] local SuperLink pid {superlink.pid}; run dir {run_dir}", markup=False)
        watcher = SiteWatcher(run_dir / "progress", lambda m: console.print(m, markup=False))
        watcher.start()
        with open(log_path or run_dir / "flower.log", "w") as log:
            flwr = subprocess.Popen(["flwr", "run", str(app), *flwr_args], env=env, cwd=PROJECT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
            _pump(flwr, StreamPrinter(console, log, verbose=verbose), timeout)
    except KeyboardInterrupt:
        raise RunInterrupted(signal.SIGINT) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if watcher is not None:
            watcher.stop()
        stopped = [p for proc in (flwr, superlink) if proc is not None for p in stop_process_tree(proc.pid)]
        reaper.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        console.print(f"[meddiff] stopped Flower processes {sorted(set(stopped))}", markup=False)


def _ray_root() -> Path:
    """A fresh private folder for Ray's session files (and the staged app). Ray's socket paths add ~70 characters and a
    Unix socket path may not exceed 107, so a long temporary directory falls back to /tmp."""
    base = tempfile.gettempdir()
    return Path(tempfile.mkdtemp(prefix="meddiff-ray-", dir=base if len(base) <= 24 else "/tmp"))


def _raise_interrupted(signum, _frame) -> None:
    raise RunInterrupted(signum)


def _pump(proc: subprocess.Popen, printer: StreamPrinter, timeout: float) -> None:
    """Feed ``proc``'s output to ``printer`` until it exits; stop it after ``timeout`` seconds."""
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise RunFailed(f"the run did not finish within --timeout {timeout:g} s and was stopped") from None
            continue
        if line is None:
            break
        printer.feed(line)
    proc.wait()


def _outcome(run_dir: Path, started: float, console: Console, log_file: Path) -> Path:
    """The run directory if the run wrote a fresh summary that is not a failure; else RunFailed."""
    import json

    path = run_dir / "summary.json"
    if not path.is_file() or path.stat().st_mtime < started:
        raise RunFailed(f"the federated run ended without writing {path}: the server stopped with an error; "
                        f"{_last_error(log_file)}(full log: {log_file})")
    summary = json.loads(path.read_text())
    final_table(console, run_dir, summary)
    if summary.get("status") == "failed":
        raise RunFailed(f"the run failed: {summary.get('stop_reason') or 'no round aggregated an update'} "
                        f"(see {run_dir / 'summary.md'})")
    console.print(f"[meddiff] done ({summary.get('status')}): {run_dir / 'summary.md'}", markup=False)
    return run_dir


def _last_error(log_file: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ("Error" in ln or "error" in ln) and not ln.startswith("File ")]
    return f"last error: {errors[-1][-400:]} " if errors else ""
