"""The processes a local federation starts, found through ``/proc`` and stopped by PID.

Flower's local simulation is a tree: our SuperLink, its SuperExec, the simulation process, Ray's
GCS, raylet and actors. :func:`stop_process_tree` stops a tree; :class:`Reaper` is a watchdog in
its own session that stops whatever the driver started if the driver itself dies, even by
SIGKILL (which no handler sees), so no federation outlives ``meddiff simulate`` and spends a
site's privacy budget after the user stopped it. Linux only, like Flower's simulation engine.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def port_owner(port: int) -> str:
    """Which process listens on ``port`` (``"pid 123 (flower-superlink --insecure ...)"``), or ""."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            targets = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in targets for inode in inodes):
            return f"pid {entry.name} ({command_line(int(entry.name))[:120]})"
    return ""


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _stat(pid: int) -> Optional[list[str]]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (tells a PID from its reuse)."""
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc), parents before children."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_all(pids: Iterable[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_processes(pids: list[int], *, grace: float = 10.0) -> list[int]:
    """SIGTERM ``pids``, then SIGKILL those left after ``grace`` seconds; returns ``pids``."""
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    signal_all([p for p in pids if alive(p)], signal.SIGKILL)
    for p in pids:
        try:
            os.waitpid(p, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass
    return pids


def stop_process_tree(pid: int, *, grace: float = 10.0) -> list[int]:
    """SIGTERM ``pid`` and its descendants, then SIGKILL what is left after ``grace`` seconds."""
    return stop_processes([pid] + descendants(pid), grace=grace)


class Reaper:
    """A watchdog process (``python -m sim.processes <driver pid> [folder ...]``) that stops every
    descendant of the driver once the driver has died, by whatever signal, then removes the
    driver's temporary ``folders``. ``close()`` ends it when the driver cleaned up itself."""

    def __init__(self, driver_pid: Optional[int] = None, folders: Iterable[Path] = ()):
        self.proc = subprocess.Popen([sys.executable, "-m", "sim.processes", str(driver_pid or os.getpid()),
                                      *map(str, folders)],
                                     cwd=str(Path(__file__).resolve().parents[1]), start_new_session=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _watch(driver: int, folders: list[str], poll: float = 0.5) -> None:
    """Snapshot the driver's descendants until it dies, then stop every one still alive and
    remove ``folders``."""
    known: dict[int, Optional[int]] = {}
    pidfd = os.pidfd_open(driver)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the driver stopped its processes itself
    while True:
        for pid in descendants(driver):
            known.setdefault(pid, start_time(pid))
        if select.select([pidfd], [], [], poll)[0]:
            break
    same = [p for p, started in known.items() if alive(p) and start_time(p) == started and p != os.getpid()]
    stop_processes(same + [d for p in same for d in descendants(p) if d not in known], grace=10.0)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2:])
