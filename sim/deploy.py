"""A secured deployment on one machine: SuperLink with TLS and SuperNode authentication, plus sites.

Used by the deployment tests and as a worked example of the commands a hospital consortium runs
(see README "Deploying across hospitals"). Everything binds to 127.0.0.1 and every process it
starts is stopped by PID (:func:`sim.processes.stop_process_tree`).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sim.processes import free_port, stop_process_tree
from sim.app_bundle import PROJECT, stage_app
from sim.run import flower_env


@dataclass
class Deployment:
    """Processes and addresses of a local secured federation."""

    workdir: Path
    certs: Path
    env: dict
    fleet: str = ""
    control: str = ""
    superlink: Optional[subprocess.Popen] = None
    supernodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    #: SQLite file for the SuperLink's state (node identities and run history survive a restart);
    #: empty keeps it in memory, which cannot report "database is locked" on a loaded machine
    database: str = ""

    @property
    def database_args(self) -> list[str]:
        return ["--database", self.database] if self.database else []

    def make_certs(self, sites: list[str]) -> None:
        subprocess.run(["bash", str(PROJECT / "deploy" / "make_certs.sh"), str(self.certs), "localhost", *sites],
                       check=True, capture_output=True)

    def start_superlink(self) -> None:
        port = free_port()  # flwr 1.42 serves the Fleet, Control and Runtime APIs over HTTPS on one port
        self.fleet = self.control = f"127.0.0.1:{port}"
        c = self.certs
        cmd = ["flower-superlink", "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
               "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth", *self.database_args,
               "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
        log = open(self.workdir / "superlink.log", "w")
        self.superlink = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        (self.env_home / "config.toml").write_text(
            f'[superlink]\ndefault = "consortium"\n\n[superlink.consortium]\naddress = "{self.control}"\n'
            f'root-certificates = "{c / "ca.crt"}"\n')
        self._wait_for(lambda: self.flwr(["ls"], check=False).returncode == 0, "SuperLink control API")

    @property
    def env_home(self) -> Path:
        return Path(self.env["FLWR_HOME"])

    def flwr(self, args: list[str], *, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=PROJECT, capture_output=True, text=True, check=check, timeout=timeout)

    def run_study(self, run_config: str, *, timeout: float) -> subprocess.CompletedProcess:
        """``flwr run`` of the app (staged once, see :mod:`sim.app_bundle`) on this federation."""
        app = self.workdir / "app"
        if not app.is_dir():
            stage_app(app)
        return self.flwr(["run", str(app), "consortium", "--stream", "--run-config", run_config], check=False, timeout=timeout)

    def register(self, site: str) -> None:
        self.flwr(["supernode", "register", str(self.certs / "sites" / f"{site}.pub"), "consortium"])

    def start_supernode(self, site: str, node_config: str) -> subprocess.Popen:
        key = self.certs / "sites" / site
        cmd = ["flower-supernode", "--root-certificates", str(self.certs / "ca.crt"), "--superlink", self.fleet,
               "--auth-supernode-private-key", str(key), "--auth-supernode-public-key", f"{key}.pub",
               "--node-config", node_config, "--port", str(free_port()), "--max-retries", "3", "--max-wait-time", "20"]
        log = open(self.workdir / f"supernode-{site}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.supernodes[site] = proc
        return proc

    def _wait_for(self, ok, what: str, timeout: float = 300) -> None:
        """Poll ``ok`` until it holds; the bound only stops a broken start, never a slow one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what} not ready within {timeout:.0f} s; logs in {self.workdir}")

    def stop(self) -> list[int]:
        stopped = []
        for proc in list(self.supernodes.values()) + ([self.superlink] if self.superlink else []):
            if proc.poll() is None:
                stopped += stop_process_tree(proc.pid)
            proc.wait(timeout=15)
        return stopped


def new_deployment(workdir: Path) -> Deployment:
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "flwr_home"
    home.mkdir(exist_ok=True)
    env = flower_env(home, free_port(), free_port())
    env["OMP_NUM_THREADS"] = "1"  # several sites share this machine: one thread each, or they thrash
    return Deployment(workdir=workdir, certs=workdir / "certs", env=env)
