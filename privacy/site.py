"""A site's privacy around each round, as one object (:class:`SitePrivacy`): its ledger,
enrolment, budget check, the DP-SGD wrapping of the round and its record.

The guarantee is record-level (epsilon, delta)-DP for each site's own dataset:

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

log = logging.getLogger("meddiff.privacy")

LEDGER_FILE = "privacy_ledger.json"


def open_site_ledger(state_dir: str | Path, *, site: str, num_examples: int, privacy_cfg: PrivacyConfig,
                     budget: float, mirror: Optional[str] = None, server_copy: Optional[str] = None) -> PrivacyLedger:
    """The site's ledger (a fresh one at its first round), reconciled with the in-memory mirror and
    with the server's record of this site (``server_copy``): whichever holds the most steps wins,
    so a moved, copied or restored state directory never restarts the site's accounting at zero."""
    path = Path(state_dir) / LEDGER_FILE
    ledger = PrivacyLedger.open(path, site=site, delta=site_delta(privacy_cfg, num_examples, site), budget=budget)
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
                 keep_mirror: Callable[[str], None]):
        self.cfg, self.ledger, self.calibration, self._keep_mirror = cfg, ledger, calibration, keep_mirror

    @classmethod
    def open(cls, cfg: ExperimentConfig, *, site: str, num_examples: int, state_dir: str | Path, budget: float,
             study: str, mirror: Optional[str] = None, server_copy: Optional[str] = None,
             keep_mirror: Callable[[str], None] = lambda text: None) -> "SitePrivacy":
        """Reload the ledger and enrol in ``study`` (once, for all of its DP phases: one sigma).
        Raises :class:`BudgetExhausted` when no sigma fits the budget."""
        ledger = open_site_ledger(state_dir, site=site, num_examples=num_examples, privacy_cfg=cfg.privacy,
                                  budget=budget, mirror=mirror, server_copy=server_copy)
        keep_mirror(ledger.to_json())
        cal = enrol(ledger, study=study, num_examples=num_examples, plan=private_plan(cfg), privacy_cfg=cfg.privacy)
        keep_mirror(ledger.to_json())
        return cls(cfg, ledger, cal, keep_mirror)

    def check(self, phase: TrainingPhase, num_examples: int) -> None:
        """Raise :class:`BudgetExhausted` if a round of ``phase`` on ``num_examples`` records (the
        site's data today) would take epsilon past the budget."""
        batch_size = self.calibration.phase(phase.name)["batch_size"]
        check_budget(self.ledger, self.calibration, phase.local_steps(self.cfg),
                     sample_rate=poisson_sample_rate(num_examples, batch_size))

    def wrap(self, phase: TrainingPhase, model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
             device: torch.device) -> PrivateTraining:
        """DP-SGD for a round of ``phase``: Poisson batches of the phase's calibrated size, the
        study's sigma, on the ledger's accountant history; unpredictable noise and sampling."""
        cal, plan = self.calibration, self.calibration.phase(phase.name)
        loader = DataLoader(dataset, batch_size=plan["batch_size"], num_workers=self.cfg.train.num_workers,
                            generator=unpredictable_generator())
        return make_private(model, optimizer, loader, noise_multiplier=cal.noise_multiplier,
                            max_grad_norm=cal.max_grad_norm, noise_multiplicity=phase.noise_multiplicity(self.cfg),
                            accountant_history=self.ledger.history, grad_sample_mode=phase.grad_sample_mode(self.cfg),
                            noise_generator=unpredictable_generator(device))

    def record(self, dp: PrivateTraining, phase: TrainingPhase, server_round: int, steps: int) -> dict[str, float]:
        """Write the round into the ledger (and its mirror); the reply's privacy metrics."""
        sigma, q, _ = dp.history[-1]
        self.ledger.record(dp.history, {"study": self.calibration.study, "phase": phase.name, "round": server_round,
                                        "steps": steps, "noise_multiplier": sigma, "sample_rate": q,
                                        "max_grad_norm": self.calibration.max_grad_norm,
                                        "clip_fraction": dp.stats.clip_fraction})
        self._keep_mirror(self.ledger.to_json())
        return {"epsilon": self.ledger.epsilon(), "delta": self.ledger.delta, "noise_multiplier": sigma,
                "sample_rate": q, "clip_fraction": dp.stats.clip_fraction, "budget_exhausted": 0}

    def epsilon_during(self, dp: PrivateTraining) -> Callable[[], float]:
        """Epsilon spent so far while ``dp`` trains (for progress lines)."""
        return lambda: float(dp.engine.accountant.get_epsilon(self.ledger.delta))
