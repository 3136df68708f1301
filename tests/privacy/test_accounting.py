import json
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from privacy.accounting import PrivacyLedger, calibrate_noise_multiplier, default_delta, epsilon_of

REPO = Path(__file__).resolve().parents[2]


def test_calibration_hits_the_target():
    sigma = calibrate_noise_multiplier(target_epsilon=10.0, target_delta=1e-5, sample_rate=0.05, steps=250)
    eps = epsilon_of([(sigma, 0.05, 250)], 1e-5)
    assert 9.0 < eps <= 10.0
    assert default_delta(1000) == pytest.approx(1e-4)


def test_epsilon_rises_strictly_over_rounds_and_survives_a_restart(tmp_path):
    path = tmp_path / "site" / "ledger.json"
    ledger = PrivacyLedger.open(path, site="a", delta=1e-5, budget=10.0)
    eps = []
    history = []
    for _ in range(3):
        history = history + [(1.1, 0.05, 50)]
        ledger.record(history)
        eps.append(ledger.epsilon())
    assert eps[0] < eps[1] < eps[2]
    # a new process (a restarted site daemon) reads the file and continues, never from 0
    code = ("from privacy.accounting import PrivacyLedger; import sys; "
            f"l = PrivacyLedger.open({str(path)!r}, site='a', delta=1.0, budget=99.0); "
            "l.record(l.history + [(1.1, 0.05, 50)]); print(l.epsilon(), l.budget, l.delta)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) > eps[2]
    assert float(out[1]) == 10.0 and float(out[2]) == 1e-5  # the stored budget and delta win
    # equals a standalone Opacus RDP accountant fed the same history
    stored = json.loads(path.read_text())
    acc = RDPAccountant()
    for sigma, q, n in stored["history"]:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert acc.get_epsilon(1e-5) == pytest.approx(float(out[0]), rel=1e-9)


def test_projection_and_refusal_to_forget(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="a", delta=1e-5, budget=1.0)
    ledger.record([(1.0, 0.1, 100)])
    assert ledger.projected_epsilon(1.0, 0.1, 100) > ledger.epsilon()
    with pytest.raises(ValueError, match="forgets spent privacy"):
        ledger.record([(1.0, 0.1, 10)])


def test_corrupt_ledger_names_the_file_and_is_left_alone(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="ledger.json: unreadable privacy ledger"):
        PrivacyLedger.open(path, site="a", delta=1e-5, budget=1.0)
    assert path.read_text() == "{not json"


def test_one_sigma_calibrated_across_two_phases_composes_to_the_budget(tmp_path):
    """Latent diffusion with a private first stage: both phases' planned steps share one sigma."""
    from configs import load_config
    from meddiff.recipes.phases import private_plan as study_plan
    from privacy.calibration import check_budget, enrol

    cfg = load_config(None, ["privacy.enabled=true", "autoencoder.enabled=true", "autoencoder.mode=dp", "model.in_channels=3",
                             "model.out_channels=3", "model.attention_resolutions=[4]", "autoencoder.num_rounds=2",
                             "autoencoder.local_steps=30", "autoencoder.batch_size=16", "federation.num_rounds=3",
                             "federation.local_steps=40", "train.batch_size=32"])
    plan = study_plan(cfg)
    assert plan == {"diffusion": (32, 120), "autoencoder": (16, 60)}
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="a", delta=1e-4, budget=8.0)
    cal = enrol(ledger, study="s", num_examples=1000, plan=plan, privacy_cfg=cfg.privacy)
    ae, dm = cal.phase("autoencoder"), cal.phase("diffusion")
    assert ae["sample_rate"] == pytest.approx(1 / 63) and dm["sample_rate"] == pytest.approx(1 / 32)
    total = epsilon_of([(cal.noise_multiplier, ae["sample_rate"], 60), (cal.noise_multiplier, dm["sample_rate"], 120)], 1e-4)
    assert 7.8 < total <= 8.0
    # the first stage is paid for: more noise than the diffusion phase alone would need, which alone stays below budget
    alone = calibrate_noise_multiplier(target_epsilon=8.0, target_delta=1e-4, sample_rate=dm["sample_rate"], steps=120)
    assert cal.noise_multiplier > alone * 1.01
    assert epsilon_of([(cal.noise_multiplier, dm["sample_rate"], 120)], 1e-4) < total - 0.1
    # spend both phases as planned: every round fits, one more does not
    for q, steps in [(ae["sample_rate"], 30)] * 2 + [(dm["sample_rate"], 40)] * 3:
        check_budget(ledger, cal, steps, sample_rate=q)
        ledger.record(ledger.history + [(cal.noise_multiplier, q, steps)])
    from privacy.refusals import BudgetExhausted

    with pytest.raises(BudgetExhausted, match="above its budget"):
        check_budget(ledger, cal, 40, sample_rate=dm["sample_rate"])
    # a stored calibration is reused, and a phase the site did not enrol for is refused
    assert enrol(ledger, study="s", num_examples=1000, plan=plan, privacy_cfg=cfg.privacy) == cal
    with pytest.raises(BudgetExhausted, match="not 'decoder'"):
        cal.phase("decoder")
