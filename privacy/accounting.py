"""Calibration and the per-site privacy ledger (RDP accountant history on the site's disk).

The ledger is the accountant history ``[(noise_multiplier, sample_rate, steps), ...]`` of Opacus's
``RDPAccountant`` (Mironov 2017; Mironov, Talwar & Zhang 2019 for the subsampled Gaussian), stored
as JSON in the site's state directory and reloaded before every round, so a restarted site
continues its epsilon instead of starting again from 0. Epsilon is recomputed from the history
alone, which is what lets an auditor reproduce it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

LEDGER_VERSION = 1


def default_delta(num_examples: int) -> float:
    """delta = 1 / (10 N): comfortably below 1/N, the level at which DP stops meaning much."""
    if num_examples < 1:
        raise ValueError(f"need at least one example, got {num_examples}")
    return 1.0 / (10.0 * num_examples)


def calibrate_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float, steps: int) -> float:
    """sigma such that ``steps`` Poisson-subsampled Gaussian steps spend ``target_epsilon`` (RDP).

    Called once per site, for the planned total (rounds x local steps), never per round.
    """
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(f"need 0 < sample_rate <= 1 and steps >= 1, got {sample_rate}, {steps}")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp"))


def epsilon_of(history, delta: float) -> float:
    """Epsilon of an accountant history at ``delta`` (a fresh RDP accountant fed the history)."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta))


@dataclass
class PrivacyLedger:
    """One site's cumulative privacy spending, persisted at ``path``."""

    path: Path
    site: str
    delta: float
    budget: float
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, *, site: str, delta: float, budget: float) -> "PrivacyLedger":
        """Load the ledger at ``path`` (or start an empty one). The stored budget and delta win: a
        restarted site cannot loosen them."""
        path = Path(path)
        if not path.exists():
            return cls(path=path, site=site, delta=delta, budget=budget)
        try:
            data = json.loads(path.read_text())
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
            return cls(path=path, site=data["site"], delta=float(data["delta"]), budget=float(data["budget"]), history=history)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable privacy ledger ({type(exc).__name__}: {exc}); it was not modified") from None

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta)

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after ``steps`` more steps at ``(noise_multiplier, sample_rate)``."""
        return epsilon_of(self.history + [(noise_multiplier, sample_rate, steps)], self.delta)

    def record(self, history) -> None:
        """Replace the history by the accountant's (which extends the stored one) and save."""
        history = [(float(s), float(q), int(n)) for s, q, n in history]
        if _steps(history) < _steps(self.history):  # Opacus merges equal consecutive entries, so compare totals
            raise ValueError(f"{self.path}: refusing to record a history that forgets spent privacy")
        self.history = history
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": LEDGER_VERSION, "site": self.site, "delta": self.delta, "budget": self.budget,
                   "accountant": "rdp", "history": [list(h) for h in self.history], "epsilon": self.epsilon()}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
        os.replace(tmp, self.path)


def _steps(history) -> int:
    return sum(int(n) for _, _, n in history)


def remaining(ledger: PrivacyLedger) -> float:
    """Budget left: ``max(0, budget - epsilon)``."""
    return max(0.0, ledger.budget - ledger.epsilon())
