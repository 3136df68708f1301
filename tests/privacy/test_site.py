"""SitePrivacy, without Flower: enrolment, budget check, the DP round and its record."""

import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from meddiff.recipes.sites import phantom_site
from meddiff.recipes.phases import DIFFUSION
from meddiff.train import train_loop
from privacy.accounting import PrivacyLedger
from privacy.refusals import BudgetExhausted
from privacy.site import LEDGER_FILE, SitePrivacy, required_state_dir, site_budget, state_dir_of
from tests.conftest import tiny_config

DP = ["privacy.enabled=true", "privacy.target_epsilon=8", "federation.num_rounds=2", "federation.local_steps=2",
      "data.num_samples=40", "privacy.max_physical_batch_size=8"]


def _open(cfg, tmp_path: Path, data, mirrors: list, **kw) -> SitePrivacy:
    return SitePrivacy.open(cfg, site="site_0", train_set=data, state_dir=tmp_path, budget=8.0, study="s1",
                            keep_mirror=mirrors.append, **kw)


def _round(privacy: SitePrivacy, cfg, data, server_round: int, phase=DIFFUSION) -> dict:
    model = phase.build_model(cfg)
    optimizer = phase.build_optimizer(cfg, model.parameters())
    dp = privacy.wrap(phase, model, optimizer, data, torch.device("cpu"))
    batches = dp.batches(cfg.privacy.max_physical_batch_size)
    try:
        result = train_loop(model=dp.model, objective=phase.build_objective(cfg), optimizer=dp.optimizer,
                            batches=batches, steps=phase.local_steps(cfg), device=torch.device("cpu"),
                            step_fn=dp.step_fn, optimizer_stepped=dp.optimizer_stepped)
    finally:
        batches.close()
    return privacy.record(dp, phase, server_round, result.steps)


def test_a_study_enrols_once_and_each_round_is_recorded_as_opacus_accounts_it(tmp_path):
    cfg = tiny_config(extra=DP)
    data, mirrors = phantom_site(0, 2, cfg), []
    privacy = _open(cfg, tmp_path, data, mirrors)
    sigma = privacy.calibration.noise_multiplier
    privacy.check(DIFFUSION)
    metrics = _round(privacy, cfg, data, 1)
    assert set(metrics) == {"epsilon", "delta", "noise_multiplier", "sample_rate", "clip_fraction", "budget_exhausted",
                            "patient_unit", "units", "records_per_patient"}
    assert not metrics["patient_unit"] and metrics["units"] == len(data)  # phantoms: one image per patient
    assert 0 < metrics["epsilon"] < 8 and metrics["noise_multiplier"] == pytest.approx(sigma)
    reference = RDPAccountant()
    reference.history = [(sigma, privacy.calibration.sample_rate, 2)]
    assert metrics["epsilon"] == pytest.approx(reference.get_epsilon(privacy.ledger.delta), rel=1e-6)
    assert json.loads(mirrors[-1])["rounds"][-1]["round"] == 1  # the mirror follows every change
    again = _open(cfg, tmp_path, data, [])  # next round: same study, same sigma, the ledger reloaded from disk
    assert again.calibration.noise_multiplier == sigma and again.ledger.steps == 2
    assert len(json.loads((tmp_path / LEDGER_FILE).read_text())["calibrations"]) == 1


def test_a_round_past_the_budget_is_refused_before_training(tmp_path):
    cfg = tiny_config(extra=DP)
    data = phantom_site(0, 2, cfg)
    privacy = _open(cfg, tmp_path, data, [])
    privacy.ledger.record([(privacy.calibration.noise_multiplier, privacy.calibration.sample_rate, 4)])
    with pytest.raises(BudgetExhausted, match="site_0: 2 more steps would raise epsilon") as info:
        privacy.check(DIFFUSION)
    assert info.value.ledger is privacy.ledger and info.value.exhausted


def test_a_spent_ledger_cannot_enrol_in_a_new_study(tmp_path):
    cfg = tiny_config(extra=DP)
    data = phantom_site(0, 2, cfg)
    ledger = PrivacyLedger.open(tmp_path / LEDGER_FILE, site="site_0", delta=1 / (10 * len(data)), budget=1.0)
    ledger.record([(0.5, 0.3, 200)])
    with pytest.raises(BudgetExhausted, match="cannot enrol in study 's1'"):
        _open(cfg, tmp_path, data, [])


def test_the_larger_of_disk_and_server_records_wins_never_the_smaller(tmp_path):
    cfg = tiny_config(extra=DP)
    data = phantom_site(0, 2, cfg)
    first = _open(cfg, tmp_path / "a", data, [])
    _round(first, cfg, data, 1)
    held = first.ledger.to_json()
    moved = _open(cfg, tmp_path / "b", data, [], server_copy=held)  # an empty state dir, the server's record
    assert moved.ledger.steps == 2 and moved.calibration == first.calibration
    _round(moved, cfg, data, 2)
    behind = _open(cfg, tmp_path / "b", data, [], server_copy=held)
    assert behind.ledger.steps == 4  # the smaller server copy did not replace the disk


def test_where_the_ledger_lives_and_whose_budget_counts(tmp_path):
    cfg = tiny_config(extra=DP)
    deployed = {"data-path": "/data/a", "site-name": "hospital_a"}
    assert state_dir_of(deployed, str(tmp_path), "hospital_a") is None  # never where the server says
    with pytest.raises(ValueError, match="hospital_a: privacy.enabled=true needs a state directory"):
        required_state_dir(deployed, str(tmp_path), "hospital_a")
    assert state_dir_of({"partition-id": 0}, str(tmp_path), "site_0") == tmp_path / "site_0"
    assert state_dir_of({**deployed, "state-dir": "/var/lib/x"}, "", "hospital_a") == Path("/var/lib/x")
    with pytest.raises(ValueError, match="needs the site's own budget"):
        site_budget(cfg, deployed, "hospital_a")
    with pytest.raises(ValueError, match="epsilon-budget must be > 0"):
        site_budget(cfg, {**deployed, "epsilon-budget": 0}, "hospital_a")
    assert site_budget(cfg, {**deployed, "epsilon-budget": 3.0}, "hospital_a") == 3.0
    assert site_budget(cfg, {"partition-id": 1}, "site_1") == 8.0
