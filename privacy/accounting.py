"""Calibration and the per-site privacy ledger (RDP accountant history on the site's disk).

The ledger is the accountant history ``[(noise_multiplier, sample_rate, steps), ...]`` of Opacus's
``RDPAccountant`` (Mironov 2017; Mironov, Talwar & Zhang 2019 for the subsampled Gaussian), stored
as JSON in the site's state directory and reloaded before every round, so a restarted site
continues its epsilon instead of starting again from 0. Epsilon is recomputed from the history
alone, which is what lets an auditor reproduce it.

Opacus's accountants are imported on first use (:func:`_accountants`): importing Opacus costs
about 2 s per process, which a run without DP never needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from meddiff.checkpoint import atomic_write_text

LEDGER_VERSION = 2


def _accountants():
    """``opacus.accountants``, imported when an epsilon or sigma is first computed."""
    import opacus.accountants
    import opacus.accountants.utils  # noqa: F401 - get_noise_multiplier

    return opacus.accountants


def default_delta(num_examples: int) -> float:
    """delta = 1 / (10 N): comfortably below 1/N, the level at which DP stops meaning much."""
    if num_examples < 1:
        raise ValueError(f"need at least one example, got {num_examples}")
    return 1.0 / (10.0 * num_examples)


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """The sample rate Opacus's Poisson loader uses for ``batch_size``: ``1 / ceil(N / B)``."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need at least one example and batch size >= 1, got {num_examples}, {batch_size}")
    return 1.0 / math.ceil(num_examples / batch_size)


def calibrate_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                               prior_history=(), extra_segments=()) -> float:
    """sigma such that ``steps`` Poisson-subsampled Gaussian steps spend ``target_epsilon`` (RDP).

    Called once per site and study, for the planned total (rounds x local steps), never per round.
    With an empty ``prior_history`` and no ``extra_segments`` this is Opacus's
    ``get_noise_multiplier``. Otherwise sigma is the smallest one (bisection, to 0.5%) whose steps,
    composed with the prior history and with the ``extra_segments`` -- further planned
    ``(sample_rate, steps)`` at the same sigma, e.g. the other phase of a latent-diffusion study
    -- stay within ``target_epsilon`` in total; Opacus has no calibration on top of a history or
    across several sample rates, hence the hand-written search.
    Raises ``ValueError`` when the prior spending leaves no room.
    """
    segments = [(sample_rate, steps)] + [(float(q), int(n)) for q, n in extra_segments]
    for q, n in segments:
        if not 0 < q <= 1 or n < 1:
            raise ValueError(f"need 0 < sample_rate <= 1 and steps >= 1, got {q}, {n}")
    prior = [tuple(h) for h in prior_history]
    if not prior and len(segments) == 1:
        return float(_accountants().utils.get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                          sample_rate=sample_rate, steps=steps, accountant="rdp"))
    spent = epsilon_of(prior, target_delta)
    if spent >= target_epsilon * 0.99:
        raise ValueError(f"epsilon {spent:.3f} is already spent of the budget {target_epsilon:g}; no room for another study")

    def eps(sigma: float) -> float:
        return epsilon_of(prior + [(sigma, q, n) for q, n in segments], target_delta)

    low, high = 0.1, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier keeps epsilon within {target_epsilon:g} after the prior spending of {spent:.3f}")
    while high / low > 1.005:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if eps(mid) <= target_epsilon else (mid, high)
    return float(high)


def epsilon_of(history, delta: float) -> float:
    """Epsilon of an accountant history at ``delta`` (a fresh RDP accountant fed the history)."""
    if not history:
        return 0.0
    accountant = _accountants().RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta))


def prv_epsilon_of(history, delta: float) -> Optional[float]:
    """A second opinion from Opacus's PRV accountant (Gopi et al. 2021), or None when PRV fails
    numerically (it does for some settings, which is why RDP is the accountant of record)."""
    if not history:
        return 0.0
    try:
        accountant = _accountants().PRVAccountant()
        accountant.history = [tuple(h) for h in history]
        value = float(accountant.get_epsilon(delta))
    except Exception:  # noqa: BLE001 - PRV's numerical failures are varied (ValueError, RuntimeError, ...)
        return None
    return value if math.isfinite(value) else None


@dataclass
class PrivacyLedger:
    """One site's cumulative privacy spending, persisted at ``path``."""

    path: Path
    site: str
    delta: float
    budget: float
    history: list[tuple[float, float, int]] = field(default_factory=list)
    #: one entry per study: ``{"study", "noise_multiplier", "sample_rate", "planned_steps", "max_grad_norm", ...}``
    calibrations: list[dict] = field(default_factory=list)
    #: one entry per trained round: ``{"study", "round", "steps", "epsilon", "clip_fraction", ...}``
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, *, site: str, delta: float, budget: float) -> "PrivacyLedger":
        """Load the ledger at ``path`` (or start an empty one). The stored delta wins and the budget
        can only be tightened: a restarted site, or a server, cannot loosen them."""
        path = Path(path)
        if not path.exists():
            return cls(path=path, site=site, delta=delta, budget=budget)
        return cls.from_json(path.read_text(), path=path, budget_cap=budget)

    @classmethod
    def from_json(cls, text: str, *, path: str | Path, budget_cap: float = math.inf) -> "PrivacyLedger":
        try:
            data = json.loads(text)
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
            return cls(path=Path(path), site=data["site"], delta=float(data["delta"]),
                       budget=min(float(data["budget"]), float(budget_cap)), history=history,
                       calibrations=list(data.get("calibrations", [])), rounds=list(data.get("rounds", [])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable privacy ledger ({type(exc).__name__}: {exc}); it was not modified") from None

    @property
    def steps(self) -> int:
        return total_steps(self.history)

    @property
    def unit(self) -> str:
        """What the ledger's epsilon protects: one patient when every study in it was patient-level,
        else one record (a patient-level guarantee implies the record-level one, not the reverse)."""
        return "patient" if {c.get("unit", "record") for c in self.calibrations} == {"patient"} else "record"

    def calibration(self, study: str) -> Optional[dict]:
        """The calibration fixed at enrolment in ``study``, if the site enrolled in it."""
        return next((c for c in self.calibrations if c["study"] == study), None)

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta)

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after ``steps`` more steps at ``(noise_multiplier, sample_rate)``."""
        return epsilon_of(self.history + [(noise_multiplier, sample_rate, steps)], self.delta)

    def record(self, history, round_info: Optional[dict] = None) -> None:
        """Replace the history by the accountant's (which extends the stored one), note the round
        (with the epsilon reached) and save."""
        history = [(float(s), float(q), int(n)) for s, q, n in history]
        if total_steps(history) < total_steps(self.history):  # Opacus merges equal consecutive entries, so compare totals
            raise ValueError(f"{self.path}: refusing to record a history that forgets spent privacy")
        self.history = history
        if round_info is not None:
            self.rounds.append({**round_info, "total_steps": self.steps, "epsilon": self.epsilon()})
        self.save()

    def to_dict(self) -> dict:
        return {"version": LEDGER_VERSION, "site": self.site, "delta": self.delta, "budget": self.budget,
                "unit": self.unit, "accountant": "rdp", "history": [list(h) for h in self.history], "epsilon": self.epsilon(),
                "calibrations": self.calibrations, "rounds": self.rounds}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self) -> None:
        """Atomic write: a crash never leaves half a ledger."""
        atomic_write_text(self.path, self.to_json())


def total_steps(history) -> int:
    """Steps in an accountant history (Opacus merges equal consecutive entries, so count, never len)."""
    return sum(int(h[2]) for h in history)
