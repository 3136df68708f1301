"""A site's training progress while a round runs: log lines for the SuperNode's log and, in
simulation, a small JSON file per site and round that ``meddiff simulate`` shows on the terminal.

A round of local steps can take minutes on a hospital CPU; without this the only sign of life
would be the server's line at the end of the round.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from meddiff.checkpoint import atomic_write_text

log = logging.getLogger("meddiff.site")

#: seconds between log lines, and between progress-file writes
LOG_EVERY = 10.0
WRITE_EVERY = 1.0


class SiteProgress:
    """``on_step(step_index, loss)`` for :func:`meddiff.train.train_loop`.

    Args:
        site: the site's name; ``phase``, ``server_round``, ``num_rounds``: where the run is.
        total: local steps of the round.
        path: the progress file (simulation), or None.
        epsilon: returns the site's epsilon so far (DP), or None without DP.
    """

    def __init__(self, site: str, phase: str, server_round: int, num_rounds: int, total: int, *,
                 path: Optional[Path] = None, epsilon: Optional[Callable[[], float]] = None):
        self.site, self.phase, self.round, self.num_rounds, self.total = site, phase, server_round, num_rounds, total
        self.path, self.epsilon = path, epsilon
        self.start = time.monotonic()
        self._logged = self._written = -1e9
        self.state: dict = {}

    def __call__(self, step_index: int, loss: float) -> None:
        now, step = time.monotonic(), step_index + 1
        first_or_last = step == 1 or step == self.total
        if not (first_or_last or now - self._written >= WRITE_EVERY or now - self._logged >= LOG_EVERY):
            return
        self.state = {"site": self.site, "phase": self.phase, "round": self.round, "num_rounds": self.num_rounds,
                      "step": step, "total": self.total, "loss": float(loss), "seconds": now - self.start,
                      "epsilon": self.epsilon() if self.epsilon is not None else None, "time": time.time()}
        if self.path is not None and (first_or_last or now - self._written >= WRITE_EVERY):
            atomic_write_text(self.path, json.dumps(self.state))
            self._written = now
        if first_or_last or now - self._logged >= LOG_EVERY:
            log.info("%s", describe(self.state))
            self._logged = now


def describe(state: dict) -> str:
    """One line: ``site_0 diffusion round 2/5: step 23/40, loss 0.1234, epsilon 3.21 (12 s)``."""
    eps = f", epsilon {state['epsilon']:.3f}" if state.get("epsilon") is not None else ""
    rounds = f"/{state['num_rounds']}" if state.get("num_rounds") else ""
    return (f"{state['site']} {state['phase']} round {state['round']}{rounds}: step {state['step']}/{state['total']}, "
            f"loss {state['loss']:.4f}{eps} ({state['seconds']:.0f} s)")


def progress_path(node_config, directory: str, site_name: str, phase: str, server_round: int) -> Optional[Path]:
    """The simulation's progress file of this site's round (``<directory>/<site>/<phase>_<round>.json``,
    under the server's ``<run>/progress``): one file per round, so a round's last state stays there
    for the console to show. Deployed sites keep their progress in their own log."""
    if "partition-id" not in node_config or not directory:
        return None
    return Path(directory) / site_name / f"{phase}_{server_round:04d}.json"
