"""A site's calibration for a study: one noise multiplier, fixed at enrolment, for every DP phase
of the study, within the site's budget on top of what earlier studies spent; and the budget check
that refuses a round that would pass it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

from configs import PrivacyConfig
from meddiff.recipes.phases import FINAL_PHASE, phase_named
from privacy.accounting import PrivacyLedger, calibrate_noise_multiplier, default_delta, poisson_sample_rate
from privacy.refusals import BudgetExhausted

log = logging.getLogger("meddiff.privacy")


@dataclass(frozen=True)
class Calibration:
    """What a site fixed at enrolment in a study.

    ``sample_rate``, ``planned_steps`` and ``batch_size`` describe the study's final phase; ``phases``
    holds every DP phase of the study (``{"autoencoder": {...}, "diffusion": {...}}`` for latent
    diffusion with a private first stage), all at the one ``noise_multiplier``. ``unit`` is what
    the study protects (``"patient"`` or ``"record"``); ``num_examples`` counts those units (the
    site's patients, or its records), ``num_records`` its records, ``records_per_patient`` is k and
    ``max_records_per_patient`` the most records of any one patient.
    """

    study: str
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    max_grad_norm: float
    batch_size: int
    num_examples: int
    phases: dict = field(default_factory=dict, compare=False)
    unit: str = "record"
    num_records: Optional[int] = None
    records_per_patient: int = 1
    max_records_per_patient: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def phase(self, name: str) -> dict:
        """``{"batch_size", "sample_rate", "planned_steps"}`` of phase ``name``."""
        if name in self.phases:
            return self.phases[name]
        if not self.phases:  # a ledger written before studies had several phases
            return {"batch_size": self.batch_size, "sample_rate": self.sample_rate, "planned_steps": self.planned_steps}
        raise BudgetExhausted(f"study {self.study!r}: the site enrolled for phases {sorted(self.phases)}, not {name!r}; "
                              "refusing to train outside its calibration", epsilon=math.nan)


def site_delta(privacy_cfg: PrivacyConfig, num_examples: int, site: str, unit: str = "record") -> float:
    """The configured delta, or ``1/(10 N)`` for N units (patients, or records); a delta of ``1/N``
    or more means little and is refused."""
    if privacy_cfg.target_delta is None:
        return default_delta(num_examples)
    if privacy_cfg.target_delta >= 1.0 / num_examples:
        raise ValueError(f"site {site}: privacy.target_delta={privacy_cfg.target_delta:g} is not below 1/N = "
                         f"{1.0 / num_examples:g} for its {num_examples} {unit}s; use null for 1/(10N)")
    return float(privacy_cfg.target_delta)


def enrol(ledger: PrivacyLedger, *, study: str, num_examples: int, privacy_cfg: PrivacyConfig, batch_size: int = 0,
          planned_steps: int = 0, plan: Optional[dict[str, tuple[int, int]]] = None,
          unit: Optional[dict] = None) -> Calibration:
    """The study's calibration: stored at the first round, reused after (sigma is never re-fitted per round).

    ``plan`` maps each DP phase of the study to ``(batch_size, planned_steps)``; without it the
    study has one phase, the final one, of ``batch_size`` and ``planned_steps``. One sigma covers
    the composition of all phases within the budget. ``num_examples`` is the number of privacy
    units (patients at the patient unit: the sample rate is then ``q`` over patients, and batch
    sizes count patients); ``unit`` (:meth:`privacy.patients.SiteUnits.describe`) is kept with the
    calibration, by default one record per unit.
    """
    stored = ledger.calibration(study)
    if stored is not None:
        return Calibration.from_dict(stored)
    plan = dict(plan or {FINAL_PHASE.name: (batch_size, planned_steps)})
    try:
        sigma, phases = calibrate_study(budget=ledger.budget, delta=ledger.delta, num_examples=num_examples, plan=plan,
                                        prior_history=ledger.history)
    except ValueError as exc:
        raise BudgetExhausted(f"site {ledger.site}: cannot enrol in study {study!r}: {exc}", epsilon=ledger.epsilon(),
                              ledger=ledger) from None
    main = phases[denoiser_in(plan)]
    about = {k: v for k, v in (unit or {"unit": "record", "num_records": int(num_examples)}).items()
             if k in Calibration.__dataclass_fields__}
    cal = Calibration(study=study, noise_multiplier=sigma, sample_rate=main["sample_rate"], planned_steps=main["planned_steps"],
                      max_grad_norm=privacy_cfg.max_grad_norm, batch_size=main["batch_size"], num_examples=int(num_examples),
                      phases=phases, **about)
    ledger.calibrations.append({**cal.__dict__, "budget": ledger.budget, "delta": ledger.delta,
                                "prior_epsilon": ledger.epsilon(), "enrolled_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    ledger.save()
    log.info("site %s enrolled in %s: sigma %.4f for phases %s, budget %g per %s (%d)", ledger.site, study, sigma,
             {k: (round(v["sample_rate"], 5), v["planned_steps"]) for k, v in phases.items()}, ledger.budget, cal.unit,
             cal.num_examples)
    return cal


def denoiser_in(plan: dict) -> str:
    """The plan's denoiser phase (the one a study samples from): its sample rate and steps are the
    calibration's own; the other phases are extra segments of the same ledger."""
    names = [n for n in plan if phase_named(n).trains_study_model]
    if len(names) != 1:
        raise ValueError(f"a study's plan must include exactly one denoiser phase, got {sorted(plan)}")
    return names[0]


def calibrate_study(*, budget: float, delta: float, num_examples: int, plan: dict[str, tuple[int, int]],
                    prior_history=()) -> tuple[float, dict]:
    """One sigma for every DP phase of ``plan`` (``{phase: (batch_size, planned_steps)}``) within
    ``budget`` on top of ``prior_history``; ``(sigma, {phase: {batch_size, sample_rate,
    planned_steps}})``. Raises ``ValueError`` when no sigma fits."""
    main_name = denoiser_in(plan)
    phases = {name: {"batch_size": int(b), "sample_rate": poisson_sample_rate(num_examples, b), "planned_steps": int(n)}
              for name, (b, n) in plan.items()}
    main = phases[main_name]
    extra = [(p["sample_rate"], p["planned_steps"]) for name, p in phases.items() if p is not main]
    sigma = calibrate_noise_multiplier(target_epsilon=budget, target_delta=delta, sample_rate=main["sample_rate"],
                                       steps=main["planned_steps"], prior_history=prior_history, extra_segments=extra)
    return sigma, phases


def check_budget(ledger: PrivacyLedger, cal: Calibration, steps: int, *, sample_rate: Optional[float] = None) -> None:
    """Raise :class:`BudgetExhausted` if ``steps`` more steps would take epsilon past the budget.

    ``sample_rate`` is the rate of the site's data today (default: the enrolment's)."""
    epsilon = ledger.epsilon()
    projected = ledger.projected_epsilon(cal.noise_multiplier, sample_rate or cal.sample_rate, steps)
    if projected > ledger.budget * (1 + 1e-9):
        raise BudgetExhausted(
            f"site {ledger.site}: {steps} more steps would raise epsilon from {epsilon:.3f} to {projected:.3f}, "
            f"above its budget {ledger.budget:g} (delta {ledger.delta:.2e}); refusing to train", epsilon=epsilon, ledger=ledger)
