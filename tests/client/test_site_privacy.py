"""Site-level DP through the real ClientApp: ledger on disk, restarts, budget refusal."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant

from client.client_app import train
from client.local import local_evaluate, local_train
from meddiff.recipes.build import build_unet_from_section
from meddiff.recipes.sites import phantom_site
from privacy.accounting import PrivacyLedger
from privacy.calibration import enrol
from privacy.site import LEDGER_FILE, SitePrivacy
from protocol import TRAIN_METRIC_KEYS
from tests.conftest import TINY_OVERRIDES, tiny_config
from tests.flower_helpers import as_node, server_message

REPO = Path(__file__).resolve().parents[2]
DP = ["privacy.enabled=true", "federation.local_steps=2", "federation.num_rounds=3", "data.num_samples=60",
      "train.batch_size=8", "privacy.max_physical_batch_size=4", "model.num_classes=2", "diffusion.noise_multiplicity=2"]


def _ctx(node_config, state=None):
    return Context(run_id=1, node_id=11, node_config=node_config, state=state if state is not None else RecordDict(), run_config={})


def _round(cfg, state_dict, rnd, node_config, state=None, study="s1", known=None):
    msg = server_message(cfg, state_dict, dst=11, round_=rnd, study_id=study, known_ledgers=known or {})
    as_node(11)
    return train(msg, _ctx(node_config, state)).content


def test_epsilon_accumulates_over_rounds_survives_a_restart_and_matches_opacus(tmp_path):
    cfg = tiny_config(extra=DP)
    weights = build_unet_from_section(cfg.model, 16).state_dict()
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "site0")}
    state = RecordDict()
    eps = []
    for rnd in (1, 2):
        content = _round(cfg, weights, rnd, node, state)
        m = content["metrics"]
        assert set(m.keys()) == set(TRAIN_METRIC_KEYS) and m["budget_exhausted"] == 0 and m["steps"] == 2
        assert 0 <= m["clip_fraction"] <= 1 and m["noise_multiplier"] > 0 and 0 < m["sample_rate"] <= 1
        assert not any(k.startswith("_module.") for k in content["arrays"].keys())
        assert json.loads(content["privacy"]["ledger"])["epsilon"] == pytest.approx(m["epsilon"])
        eps.append(m["epsilon"])
        weights = {k: v.float() for k, v in content["arrays"].to_torch_state_dict().items()}
    assert "privacy-ledger" in state  # mirrored in context.state

    # a restarted site daemon: a new process, fresh context.state, same state dir
    code = f"""
import json, torch
from flwr.app import Context, RecordDict
from client.client_app import train
from configs import load_config
from meddiff.recipes.build import build_unet_from_section
from tests.flower_helpers import as_node, server_message
cfg = load_config(None, {TINY_OVERRIDES + DP!r})
msg = server_message(cfg, build_unet_from_section(cfg.model, 16).state_dict(), dst=11, round_=3, study_id="s1")
as_node(11)
out = train(msg, Context(run_id=1, node_id=11, node_config={node!r}, state=RecordDict(), run_config={{}}))
print(json.dumps(dict(out.content["metrics"])))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    third = json.loads(out.stdout.strip().splitlines()[-1])
    eps.append(third["epsilon"])
    assert eps[0] < eps[1] < eps[2]  # strictly rising, and the restart continued instead of starting at 0

    ledger = json.loads((tmp_path / "site0" / LEDGER_FILE).read_text())
    assert sum(n for _, _, n in ledger["history"]) == 6 and len(ledger["rounds"]) == 3
    acc = RDPAccountant()  # a standalone accountant stepped through the same history
    for sigma, q, n in ledger["history"]:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert acc.get_epsilon(ledger["delta"]) == pytest.approx(eps[2], rel=1e-9)
    assert ledger["delta"] == pytest.approx(1 / (10 * 27))  # 1/(10 N) for the site's 27 training images
    assert eps[2] <= cfg.privacy.target_epsilon  # calibrated for 3 rounds: the third one still fits

    # a fourth round does not fit the budget: refused, no weights leave the site, the ledger is untouched
    before = (tmp_path / "site0" / LEDGER_FILE).read_text()
    content = _round(cfg, weights, 4, node)
    assert "arrays" not in content and content["metrics"]["budget_exhausted"] == 1
    assert set(content["metrics"].keys()) == set(TRAIN_METRIC_KEYS)
    assert "above its budget" in content["refusal"]["reason"] and "site_0" in content["refusal"]["reason"]
    assert (tmp_path / "site0" / LEDGER_FILE).read_text() == before


def test_lost_ledger_file_is_restored_from_the_mirror_and_the_budget_cannot_be_raised(tmp_path):
    cfg = tiny_config(extra=DP)
    weights = build_unet_from_section(cfg.model, 16).state_dict()
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "s"), "epsilon-budget": 4.0}
    state = RecordDict()
    first = _round(cfg, weights, 1, node, state)["metrics"]["epsilon"]
    (tmp_path / "s" / LEDGER_FILE).unlink()
    second = _round(cfg, weights, 2, node, state)["metrics"]["epsilon"]
    assert second > first  # continued from the mirror, not from 0
    # the server's config asks for a larger budget, and the node config too after a restart: the stored one stands
    bigger = tiny_config(extra=DP + ["privacy.target_epsilon=50"])
    _round(bigger, weights, 3, dict(node, **{"epsilon-budget": 50.0}))
    assert json.loads((tmp_path / "s" / LEDGER_FILE).read_text())["budget"] == 4.0


def test_deployed_site_needs_its_own_budget_and_state_dir(tmp_path):
    """Where the ledger lives and whose budget counts: tests/privacy/test_site.py; here, through the ClientApp."""
    cfg = tiny_config(extra=DP)
    weights = build_unet_from_section(cfg.model, 16).state_dict()
    failed = _round(cfg, weights, 1, {"partition-id": 0, "num-partitions": 2})  # simulation, but no root from the server
    assert "needs a state directory" in failed["failure"]["reason"] and "arrays" not in failed.array_records


def test_a_site_whose_ledger_is_spent_refuses_to_enrol_in_a_new_study(tmp_path):
    cfg = tiny_config(extra=DP)
    data = phantom_site(0, 2, cfg)
    ledger = PrivacyLedger.open(tmp_path / LEDGER_FILE, site="site_0", delta=1 / (10 * len(data)), budget=1.0)
    ledger.record([(0.5, 0.3, 200)])  # far beyond epsilon 1 already
    ledger.save()
    content = _round(cfg, build_unet_from_section(cfg.model, 16).state_dict(), 1, {"partition-id": 0, "num-partitions": 2,
                                                                       "state-dir": str(tmp_path)}, study="s2")
    assert content["metrics"]["budget_exhausted"] == 1 and "cannot enrol" in content["refusal"]["reason"]


@pytest.mark.slow
def test_dp_training_still_lowers_the_loss_on_phantoms(tmp_path):
    cfg = tiny_config(extra=["privacy.enabled=true", "federation.local_steps=60", "federation.num_rounds=1", "data.num_samples=600",
                             "train.batch_size=64", "privacy.max_physical_batch_size=64", "train.lr=2e-3", "model.num_classes=0",
                             "privacy.max_grad_norm=1.0"])
    data = phantom_site(0, 2, cfg)
    held_out = phantom_site(0, 2, cfg, split="test")
    state = build_unet_from_section(cfg.model, 16).state_dict()
    ledger = PrivacyLedger.open(tmp_path / LEDGER_FILE, site="site_0", delta=1 / (10 * len(data)), budget=10.0)
    cal = enrol(ledger, study="s", num_examples=len(data), batch_size=64, planned_steps=60, privacy_cfg=cfg.privacy)
    before = local_evaluate(cfg, state, held_out, site_index=0)["eval_loss"]
    privacy = SitePrivacy(cfg, ledger, cal, keep_mirror=lambda text: None)
    trained, metrics = local_train(cfg, state, data, server_round=1, site_index=0, privacy=privacy)
    after = local_evaluate(cfg, trained, held_out, site_index=0)["eval_loss"]
    assert metrics["epsilon"] <= 10.0 and math.isfinite(after)
    assert after < 0.8 * before, (before, after, cal.noise_multiplier)


def test_central_dp_mod_clips_the_update_only_when_the_server_asks():
    from client.client_app import app

    cfg = tiny_config(extra=["federation.local_steps=2", "data.num_samples=40", "train.lr=0.05"])
    start = build_unet_from_section(cfg.model, 16).state_dict()

    def update_norm(**fields):
        msg = server_message(cfg, start, dst=11, **fields)
        as_node(11)
        out = app(msg, _ctx({"partition-id": 0, "num-partitions": 2}))
        assert not out.has_error(), out.error
        new = out.content["arrays"].to_torch_state_dict()
        return float(torch.sqrt(sum(((new[k].float() - start[k].float()) ** 2).sum() for k in start)))

    free = update_norm()
    clipped = update_norm(clipping_norm=0.01, central_dp="fixed")
    assert free > 0.05 and clipped == pytest.approx(0.01, rel=1e-3)


def test_central_dp_config_rules_and_strategy_wrapper():
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    from configs import ConfigError
    from server.strategy import base_strategy, create_strategy

    cfg = tiny_config(extra=["privacy.central_dp=fixed", "privacy.central_noise_multiplier=0.5"])
    strategy = create_strategy(cfg.federation, cfg.privacy)
    assert isinstance(strategy, DifferentialPrivacyClientSideFixedClipping) and strategy.noise_multiplier == 0.5
    assert base_strategy(strategy).weighted_by_key == "steps"  # equal weights: the noise is calibrated to a plain mean
    with pytest.raises(ConfigError, match="central_dp.*fedavg or fedprox"):
        tiny_config(extra=["privacy.central_dp=fixed", "federation.strategy=fedmedian"])


def test_a_site_with_its_own_budget_never_trains_without_dp(tmp_path):
    cfg = tiny_config(extra=["federation.local_steps=1", "data.num_samples=40"])  # the server turned DP off
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path), "epsilon-budget": 5.0}
    content = _round(cfg, build_unet_from_section(cfg.model, 16).state_dict(), 1, node)
    assert "arrays" not in content and content["metrics"]["budget_exhausted"] == 0
    assert "trains only with DP" in content["refusal"]["reason"]


def test_a_site_that_lost_its_ledger_adopts_the_servers_larger_record_never_a_smaller_one(tmp_path):
    """A moved or copied run, or a restored state directory: the site's own ledger is gone (or
    behind), the server's checkpoint holds the site's spending, and the site continues from it."""
    cfg = tiny_config(extra=DP)
    weights = build_unet_from_section(cfg.model, 16).state_dict()
    first = _round(cfg, weights, 1, {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "a")})
    held = json.loads(first["privacy"]["ledger"])
    fresh = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "b")}  # an empty state dir
    second = _round(cfg, weights, 2, fresh, known={held["site"]: held})
    ledger = json.loads(second["privacy"]["ledger"])
    assert sum(h[2] for h in ledger["history"]) == 2 * 2  # round 1's steps were kept, round 2's added
    assert len(ledger["calibrations"]) == 1 and ledger["calibrations"][0]["noise_multiplier"] == \
        held["calibrations"][0]["noise_multiplier"]  # no re-enrolment at a new sigma
    assert second["metrics"]["epsilon"] > first["metrics"]["epsilon"]
    on_disk = json.loads((tmp_path / "b" / LEDGER_FILE).read_text())
    assert sum(h[2] for h in on_disk["history"]) == 4
    # a smaller record from the server never replaces a larger one on disk
    third = _round(cfg, weights, 3, fresh, known={held["site"]: held})
    assert sum(h[2] for h in json.loads(third["privacy"]["ledger"])["history"]) == 6
