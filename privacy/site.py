"""A site's privacy around each round, as one object (:class:`SitePrivacy`): its ledger,
enrolment, budget check, the DP-SGD wrapping of the round and its record.

The guarantee is (epsilon, delta)-DP for each site's own dataset at its privacy unit
(:mod:`privacy.patients`): one patient (all of its records) when some patient of the site has
several records, else one record; ``privacy.unit`` can fix either. At the patient unit, N below is
the number of patients, the sample rate is over patients and each step clips one gradient per
patient; everything else is the same.

1. **Ledger.** ``<state-dir>/privacy_ledger.json`` on the site's own disk, reloaded before every
   round and mirrored in the ClientApp's ``context.state``. If the file vanished mid-run while
   the mirror holds more steps, the mirror is written back: spending is never forgotten.
2. **Enrolment.** The first round of a study fixes sigma from the site's own budget, its delta
   (default ``1/(10 N)``), its Poisson sample rate and the planned rounds x local steps, on top
   of what earlier studies already spent. Later rounds of the study reuse it.
3. **Budget check.** Before training, the site projects epsilon after this round's steps; above
   the budget it refuses (:mod:`privacy.refusals`), so no site ever trains past it.
4. **The round.** DP-SGD at the calibrated sigma on the ledger's accountant history, with noise
   and Poisson sampling the server cannot predict; the round's steps go into the ledger.

The budget comes from the site's configuration (``--node-config epsilon-budget=...`` in a
deployment), and a stored ledger's budget can only be tightened, never raised by a server.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from configs import ExperimentConfig, PrivacyConfig
from meddiff.recipes.phases import TrainingPhase, private_plan
from privacy.accounting import PrivacyLedger, poisson_sample_rate
from privacy.calibration import Calibration, check_budget, enrol, site_delta
from privacy.engine import PrivateTraining, make_private
from privacy.patients import PatientSampler, SiteUnits, site_units
from privacy.refusals import SiteRefusal

log = logging.getLogger("meddiff.privacy")

LEDGER_FILE = "privacy_ledger.json"


def open_site_ledger(state_dir: str | Path, *, site: str, num_examples: int, privacy_cfg: PrivacyConfig,
                     budget: float, mirror: Optional[str] = None, server_copy: Optional[str] = None,
                     unit: str = "record") -> PrivacyLedger:
    """The site's ledger (a fresh one at its first round), reconciled with the in-memory mirror and
    with the server's record of this site (``server_copy``): whichever holds the most steps wins,
    so a moved, copied or restored state directory never restarts the site's accounting at zero."""
    path = Path(state_dir) / LEDGER_FILE
    ledger = PrivacyLedger.open(path, site=site, delta=site_delta(privacy_cfg, num_examples, site, unit), budget=budget)
    for origin, text in (("this process's mirror", mirror), ("the server's record of this site", server_copy)):
        if not text:
            continue
        try:
            copy = PrivacyLedger.from_json(text, path=path, budget_cap=ledger.budget)
        except ValueError:
            log.warning("site %s: %s is unreadable; ignored", site, origin)
            continue
        if copy.site != site:
            log.warning("site %s: %s names site %r; ignored", site, origin, copy.site)
            continue
        if copy.steps > ledger.steps:
            log.warning("site %s: %s holds %d steps but %s holds %d; adopting the larger record", site, path,
                        ledger.steps, origin, copy.steps)
            copy.delta = min(copy.delta, ledger.delta)
            ledger = copy
            ledger.save()
    return ledger


def resolve_units(privacy_cfg: PrivacyConfig, train_set: Dataset, site: str, ledger: Optional[PrivacyLedger] = None,
                  study: str = "") -> SiteUnits:
    """The site's privacy unit: ``privacy.unit`` resolved on its training data; with ``auto``, a
    study the ledger already enrolled in keeps the unit it enrolled at (a resumed study never
    changes its unit)."""
    setting = privacy_cfg.unit
    stored = ledger.calibration(study) if ledger is not None else None
    if setting == "auto" and stored:
        setting = stored.get("unit", "record")
    return site_units(train_set, setting, privacy_cfg.records_per_patient, site=site,
                      max_physical_batch_size=privacy_cfg.max_physical_batch_size)


def state_dir_of(node_config: Mapping, site_state_root: str, site: str) -> Optional[Path]:
    """Where the site keeps its ledger: ``--node-config state-dir=...``; in simulation, the
    server-provided root plus the site name; None for a deployed site without one. A deployed
    site never takes the server's word for it."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    if "partition-id" in node_config and site_state_root:
        return Path(site_state_root) / site
    return None


def required_state_dir(node_config: Mapping, site_state_root: str, site: str) -> Path:
    """:func:`state_dir_of`, or a clear error for a DP site that has none."""
    found = state_dir_of(node_config, site_state_root, site)
    if found is None:
        raise ValueError(f"site {site}: privacy.enabled=true needs a state directory for the privacy ledger; "
                         "start the SuperNode with --node-config 'state-dir=\"/var/lib/meddiff\" ...'")
    return found


def site_budget(cfg: ExperimentConfig, node_config: Mapping, site: str) -> float:
    """The site's epsilon budget: ``--node-config epsilon-budget=...``; the experiment's
    ``privacy.target_epsilon`` only for simulated sites (in a deployment the server cannot set it)."""
    if "epsilon-budget" in node_config:
        budget = float(node_config["epsilon-budget"])
        if not budget > 0:
            raise ValueError(f"site {site}: node config epsilon-budget must be > 0, got {budget}")
        return budget
    if "partition-id" in node_config:
        return cfg.privacy.target_epsilon
    raise ValueError(f"site {site}: privacy.enabled=true needs the site's own budget: "
                     "--node-config 'epsilon-budget=8.0 ...'")


def unpredictable_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS entropy pool, for DP noise and Poisson sampling.

    They must not derive from the experiment seed, which the server knows: a server that can
    replay the noise can subtract it, and one that knows which records were sampled voids
    the subsampling amplification the accountant assumes.
    """
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


class SitePrivacy:
    """One site's privacy in one study: its ledger (reconciled with every copy), its calibration,
    the budget check before a round, the DP-SGD wrapping of the round, and its record after.

    ``keep_mirror(text)`` receives the ledger's JSON whenever it changes (the ClientApp keeps it
    in ``context.state``, so a ledger file deleted mid-run is written back).
    """

    def __init__(self, cfg: ExperimentConfig, ledger: PrivacyLedger, calibration: Calibration,
                 keep_mirror: Callable[[str], None], units: Optional[SiteUnits] = None):
        self.cfg, self.ledger, self.calibration, self._keep_mirror = cfg, ledger, calibration, keep_mirror
        if units is None and calibration.unit != "record":
            raise ValueError(f"site {ledger.site}: study {calibration.study!r} is {calibration.unit}-level; its units "
                             "(the patient of each record) are needed to train it")
        n = calibration.num_examples  # without the data at hand: the enrolment's records
        self.units = units or SiteUnits("record", tuple((i,) for i in range(n)), 1, 1, n)

    @classmethod
    def open(cls, cfg: ExperimentConfig, *, site: str, train_set: Dataset, state_dir: str | Path, budget: float,
             study: str, mirror: Optional[str] = None, server_copy: Optional[str] = None,
             keep_mirror: Callable[[str], None] = lambda text: None) -> "SitePrivacy":
        """Reload the ledger and enrol in ``study`` (once, for all of its DP phases: one sigma) at the
        site's privacy unit for ``train_set``. Raises :class:`BudgetExhausted` when no sigma fits the
        budget, :class:`SiteRefusal` when the study enrolled at another unit than the config asks."""
        units = resolve_units(cfg.privacy, train_set, site)
        ledger = open_site_ledger(state_dir, site=site, num_examples=units.count, privacy_cfg=cfg.privacy,
                                  budget=budget, mirror=mirror, server_copy=server_copy, unit=units.unit)
        keep_mirror(ledger.to_json())
        units = resolve_units(cfg.privacy, train_set, site, ledger, study)
        cal = enrol(ledger, study=study, num_examples=units.count, plan=private_plan(cfg), privacy_cfg=cfg.privacy,
                    unit=units.describe())
        keep_mirror(ledger.to_json())
        if cal.unit != units.unit:
            raise SiteRefusal(f"site {site}: study {study!r} enrolled at the {cal.unit} unit but privacy.unit="
                              f"{cfg.privacy.unit} asks for the {units.unit} unit; refusing to change the unit within a "
                              "study", epsilon=ledger.epsilon(), ledger=ledger)
        return cls(cfg, ledger, cal, keep_mirror, units)

    def check(self, phase: TrainingPhase) -> None:
        """Raise :class:`BudgetExhausted` if a round of ``phase`` on the site's data today (its
        patients, or records, at the study's unit) would take epsilon past the budget."""
        batch_size = self.calibration.phase(phase.name)["batch_size"]
        check_budget(self.ledger, self.calibration, phase.local_steps(self.cfg),
                     sample_rate=poisson_sample_rate(self.units.count, batch_size))

    def wrap(self, phase: TrainingPhase, model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
             device: torch.device) -> PrivateTraining:
        """DP-SGD for a round of ``phase``: Poisson batches of the phase's calibrated size, the
        study's sigma, on the ledger's accountant history; unpredictable noise and sampling."""
        cal, plan, pc = self.calibration, self.calibration.phase(phase.name), self.cfg.privacy
        loader = DataLoader(dataset, batch_size=plan["batch_size"], num_workers=self.cfg.train.num_workers,
                            generator=unpredictable_generator())
        patients = None
        if self.units.patient_level:  # the groups of what this phase trains on (images, or their latents)
            units = site_units(dataset, "patient", cal.records_per_patient)
            patients = PatientSampler(units.groups, sample_rate=poisson_sample_rate(units.count, plan["batch_size"]),
                                      records_per_patient=cal.records_per_patient,
                                      max_physical_batch_size=pc.max_physical_batch_size, generator=unpredictable_generator())
        return make_private(model, optimizer, loader, noise_multiplier=cal.noise_multiplier,
                            max_grad_norm=cal.max_grad_norm, noise_multiplicity=phase.noise_multiplicity(self.cfg),
                            accountant_history=self.ledger.history, grad_sample_mode=phase.grad_sample_mode(self.cfg),
                            noise_generator=unpredictable_generator(device), patients=patients)

    def record(self, dp: PrivateTraining, phase: TrainingPhase, server_round: int, steps: int) -> dict[str, float]:
        """Write the round into the ledger (and its mirror); the reply's privacy metrics."""
        sigma, q, _ = dp.history[-1]
        cal = self.calibration
        self.ledger.record(dp.history, {"study": cal.study, "phase": phase.name, "round": server_round,
                                        "steps": steps, "noise_multiplier": sigma, "sample_rate": q,
                                        "max_grad_norm": cal.max_grad_norm, "unit": cal.unit,
                                        "clip_fraction": dp.stats.clip_fraction})
        self._keep_mirror(self.ledger.to_json())
        return {"epsilon": self.ledger.epsilon(), "delta": self.ledger.delta, "noise_multiplier": sigma,
                "sample_rate": q, "clip_fraction": dp.stats.clip_fraction, "budget_exhausted": 0,
                "patient_unit": self.ledger.unit == "patient", "units": self.units.count,
                "records_per_patient": cal.records_per_patient}

    def epsilon_during(self, dp: PrivateTraining) -> Callable[[], float]:
        """Epsilon spent so far while ``dp`` trains (for progress lines)."""
        return lambda: float(dp.engine.accountant.get_epsilon(self.ledger.delta))
