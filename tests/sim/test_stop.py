"""A stopped ``meddiff simulate`` stops its whole federation: by SIGTERM (cleanly, no traceback)
and by SIGKILL (the watchdog does it); a failed run exits non-zero; ``--timeout`` ends in a message."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sim.processes import free_port

REPO = Path(__file__).resolve().parents[2]
BUSY = ["federation.num_sites=2", "federation.min_train_nodes=2", "federation.local_steps=1000000", "data.num_samples=40",
        "data.image_size=16", "model.model_channels=8", "model.channel_mult=[1,2]", "model.attention_resolutions=[8]",
        "model.num_head_channels=8", "model.norm_groups=4"]


def _env(tmp_path: Path, tmp: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLWR_HOME=str(tmp_path / "flwr_home"), TMPDIR=str(tmp),
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def _start(tmp_path: Path, tmp: Path, *args: str, run: str = "run") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sim.cli", "simulate", "--run-dir", str(tmp_path / run), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path, tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(proc: subprocess.Popen) -> list[str]:
    """Read the console until a site reports a training step (however long start-up takes)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if " step " in line:
            return seen
    raise AssertionError("the run ended before any site trained:\n" + "".join(seen) + proc.stderr.read())


def _processes_of(flwr_home: Path) -> list[int]:
    """Live processes started for this run (they carry its FLWR_HOME in their environment)."""
    mark = f"FLWR_HOME={flwr_home}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0") and \
                        (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def _wait_until_gone(flwr_home: Path, tmp: Path, limit: float = 180.0) -> list[int]:
    """The run's processes still alive after they had ``limit`` seconds to go; its private Ray
    root in ``tmp`` must be gone too."""
    deadline = time.monotonic() + limit
    while ((left := _processes_of(flwr_home)) or list(tmp.glob("meddiff-ray-*"))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not list(tmp.glob("meddiff-ray-*")), "the run's Ray root was left behind"
    return left


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_run_stops_every_process_it_started(tmp_path, short_tmp, sig):
    proc = _start(tmp_path, short_tmp, *BUSY)
    try:
        _wait_for_training(proc)
        assert _processes_of(tmp_path / "flwr_home")  # the federation is running
        proc.send_signal(sig)
        proc.wait(timeout=180)
        stderr = proc.stderr.read()
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in stderr
            assert "Traceback" not in stderr
        assert _wait_until_gone(tmp_path / "flwr_home", short_tmp) == []
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_timeout_and_failed_runs_end_with_a_message_and_a_non_zero_exit(tmp_path, short_tmp):
    proc = _start(tmp_path, short_tmp, "--timeout", "1", *BUSY)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "did not finish within --timeout 1 s" in err and "Traceback" not in err
    assert _wait_until_gone(tmp_path / "flwr_home", short_tmp) == []
    # a run whose sites all fail (the loss diverges at a huge learning rate) fails, and says why
    diverging = [a for a in BUSY if not a.startswith("federation.local_steps")] + [
        "federation.local_steps=3", "train.lr=1e30", "federation.max_failed_rounds=1", "federation.num_rounds=3"]
    proc = _start(tmp_path, short_tmp, *diverging, run="diverged")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "the run failed" in err, out[-2000:] + err[-2000:]
    assert "FloatingPointError" in (tmp_path / "diverged" / "logs" / "site_errors.log").read_text()
