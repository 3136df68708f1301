"""``meddiff simulate``: run an experiment on Flower's local simulation engine, end to end.

1. Resolve the config and an absolute run directory; for real datasets, write the split
   ``manifest.json`` there (the sites read their share from it).
2. Start the local simulation SuperLink ourselves (the same command ``flwr run`` would start,
   on the ports Flower's ``FLWR_LOCAL_*_PORT`` variables name) so that its PID is known.
3. ``flwr run <project> local --stream`` with the run config and the simulation size.
4. Stop the SuperLink and every process it started (SuperExec, simulation), by PID, whatever
   happened.

Runtime dependency installation, telemetry and update checks are off, and ``FLWR_HOME`` is
project-local (``<project>/.flwr_home`` unless set), holding the shipped ``config.toml``.
"""

from __future__ import annotations

import datetime as _dt
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from configs import ExperimentConfig

PROJECT = Path(__file__).resolve().parents[1]
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


def flower_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process_tree(pid: int, *, grace: float = 10.0) -> list[int]:
    """SIGTERM ``pid`` and its descendants, then SIGKILL what is left after ``grace`` seconds."""
    pids = [pid] + _children(pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_superlink(flwr_home: Path, env: dict[str, str], http_port: int, control_port: int) -> subprocess.Popen:
    """Start the local simulation SuperLink (as ``flwr run . local`` would) and wait for health."""
    for port in (http_port, control_port):
        if not _port_free(port):
            raise RuntimeError(f"port {port} on 127.0.0.1 is busy (another SuperLink?); stop it or set "
                               "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT / FLWR_LOCAL_CONTROL_API_PORT")
    runtime = flwr_home / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    cmd = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
           "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
           "--database", str(runtime / "state.db"), "--log-file", str(runtime / "superlink.log")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; see {runtime / 'superlink.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=0.5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    stop_process_tree(proc.pid)
    raise RuntimeError(f"flower-superlink did not become healthy within 30 s; see {runtime / 'superlink.log'}")


def simulate(cfg: ExperimentConfig, *, config_path: Optional[Path], overrides: list[str], run_dir: Optional[Path] = None,
             resume_from: str = "", flwr_home: Optional[Path] = None, timeout: float = 3600.0,
             http_port: Optional[int] = None, control_port: Optional[int] = None, log_path: Optional[Path] = None) -> Path:
    """Run ``cfg`` as a local Flower simulation; returns the run directory.

    The Flower log streams to the console, or to ``log_path`` when given.
    """
    from sim.manifest import build_manifest, write_manifest

    run_dir = (run_dir or Path(cfg.output.root) / (cfg.output.name or f"federated-{_dt.datetime.now():%Y%m%d-%H%M%S}")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)  # the ServerApp writes config.yaml into it
    manifest_path = ""
    if cfg.data.dataset != "phantoms":
        manifest_path = str(write_manifest(build_manifest(cfg), run_dir))
        if not log_path:
            print(f"[meddiff] split manifest: {manifest_path}")
    flwr_home = (flwr_home or Path(os.environ.get("FLWR_HOME", PROJECT / ".flwr_home"))).resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    if not (flwr_home / "config.toml").exists():
        (flwr_home / "config.toml").write_text(DEFAULT_CONNECTION)
    http_port = http_port or int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", 39091))
    control_port = control_port or int(os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", 39093))
    env = flower_env(flwr_home, http_port, control_port)

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    run_config = " ".join([
        f"config-path={q(str(Path(config_path).resolve()) if config_path else '')}",
        f"overrides={q(' '.join(overrides))}",
        f"run-dir={q(str(run_dir))}",
        f"resume-from={q(str(Path(resume_from).resolve()) if resume_from else '')}",
        f"manifest-path={q(manifest_path)}",
    ])
    fed = cfg.federation
    cmd = ["flwr", "run", str(PROJECT), "local", "--stream", "--run-config", run_config,
           "--federation-config", f"num-supernodes={fed.num_sites} client-resources-num-cpus=1"]
    superlink = start_superlink(flwr_home, env, http_port, control_port)
    (run_dir / "flower_pids.txt").write_text(f"superlink {superlink.pid}\n")
    say = (lambda m: None) if log_path else (lambda m: print(m, flush=True))
    say(f"[meddiff] local SuperLink pid {superlink.pid} on 127.0.0.1:{http_port}; run dir {run_dir}")
    log = open(log_path, "w") if log_path else None
    try:
        subprocess.run(cmd, env=env, check=True, timeout=timeout, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT if log else None)
    finally:
        if log:
            log.close()
        stopped = stop_process_tree(superlink.pid)
        say(f"[meddiff] stopped Flower processes {stopped}")
    if not (run_dir / "summary.json").exists():
        raise RuntimeError(f"the federated run ended without writing {run_dir / 'summary.json'}; "
                           f"see {flwr_home / 'local-superlink' / 'superlink.log'}")
    say(f"[meddiff] done: {run_dir / 'summary.md'}")
    return run_dir
