"""What ``meddiff simulate`` shows while a study runs: the server's lines, each site's progress
at least every ``SITE_EVERY`` seconds, and a table with the output paths at the end.

Flower prints every log line twice in a streamed run (once coloured, once with a timestamp) and
Ray adds actor and deprecation notices; all of it goes to ``<run>/flower.log``, and the console
shows only what a user needs, unless ``--verbose``.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

from rich.console import Console
from rich.table import Table

from client.progress import describe

#: seconds between two progress lines of one site
SITE_EVERY = 10.0

_TIMESTAMPED = re.compile(r"^\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2}:[A-Z]+:")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOISE = ("Since flwr 1.32", "To change federation size", "flwr federation simulation-config", "Manually terminating",
          "FutureWarning", "warnings.warn(", "Successfully installed", "Starting logstream", "Using SuperLink",
          "Successfully started run", "Starting Flower Simulation", "simulated SuperNodes)", "(ClientAppActor pid=",
          "(raylet)", "configure_train: Sampled", "aggregate_train: Received", "configure_evaluate: Sampled",
          "aggregate_evaluate: Received", "Start `flwr-serverapp` process", "RuntimeWarning")


def keep_line(line: str, verbose: bool) -> bool:
    """Whether a line of ``flwr run --stream`` output belongs on the console."""
    plain = _ANSI.sub("", line).strip()
    if verbose:
        return not _TIMESTAMPED.match(plain)  # the timestamped copy of a line printed just before
    if not plain or _TIMESTAMPED.match(plain) or any(n in plain for n in _NOISE):
        return False
    return plain.startswith("[meddiff]") or plain.startswith(("WARNING", "ERROR", "Traceback", "CRITICAL")) \
        or "Error" in plain or "error:" in plain


class StreamPrinter:
    """Copies ``flwr run`` output to the run's log file and the kept lines to the console."""

    def __init__(self, console: Console, log: TextIO, *, verbose: bool = False, quiet: bool = False):
        self.console, self.log, self.verbose, self.quiet = console, log, verbose, quiet
        self.errors: list[str] = []

    def feed(self, line: str) -> None:
        self.log.write(line)
        self.log.flush()
        plain = _ANSI.sub("", line).rstrip()
        if "ERROR" in plain or "Traceback" in plain or "Exception" in plain:
            self.errors.append(plain)
        if not self.quiet and keep_line(line, self.verbose):
            self.console.print(plain, markup=False, highlight=False, soft_wrap=True)


class SiteWatcher(threading.Thread):
    """Polls ``<run>/progress/<site>/<phase>_<round>.json`` (written by the sites) and prints a
    site's state when it changed and ``SITE_EVERY`` seconds have passed since that site's last
    line; every round's final state is printed once, and :meth:`stop` looks a last time, so no
    finished round goes unseen whatever the machine's speed."""

    def __init__(self, progress_dir: Path, show: Callable[[str], None], *, every: float = SITE_EVERY, poll: float = 1.0):
        super().__init__(daemon=True)
        self.progress_dir, self.show, self.every, self.poll = progress_dir, show, every, poll
        self._halt = threading.Event()
        self._seen: dict[Path, int] = {}
        self._last: dict[str, float] = {}

    def run(self) -> None:
        while not self._halt.wait(self.poll):
            self.check()

    def check(self) -> None:
        for path in sorted(self.progress_dir.glob("*/*.json")) if self.progress_dir.is_dir() else []:
            try:
                state = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # being replaced
            site, now = path.parent.name, time.monotonic()
            finished = state.get("step") == state.get("total")
            if state.get("step") != self._seen.get(path) and (finished or now - self._last.get(site, -1e9) >= self.every):
                self._seen[path], self._last[site] = state.get("step"), now
                self.show(f"  {describe(state)}")

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)
        self.check()


def final_table(console: Console, run_dir: Path, summary: Optional[dict]) -> None:
    """The rounds and where the outputs are."""
    if not summary:
        return
    table = Table(title=f"meddiff-fl run: {summary.get('status', '?')}", title_justify="left")
    for col in ("phase", "round", "accepted", "train loss", "held-out loss", "max epsilon", "seconds"):
        table.add_column(col, justify="right")
    for r in summary.get("rounds", []):
        eps = r.get("max_epsilon")
        table.add_row(str(r.get("phase", "")), str(r["round"]), str(r["accepted"]), f"{r['train_loss']:.4f}",
                      f"{r['eval_loss']:.4f}", "-" if eps is None or not math.isfinite(eps) else f"{eps:.3f}", f"{r['seconds']:.1f}")
    console.print(table)
    for label, key in (("samples", "samples"), ("checkpoint", "checkpoint"), ("privacy report", "privacy_report")):
        if summary.get(key):
            console.print(f"[meddiff] {label}: {summary[key]}", markup=False, highlight=False)
    console.print(f"[meddiff] summary: {run_dir / 'summary.md'}; TensorBoard: tensorboard --logdir {run_dir.parent}",
                  markup=False, highlight=False)
