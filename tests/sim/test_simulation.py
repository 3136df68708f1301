"""End to end on Flower's local simulation engine (SuperLink on 127.0.0.1, stopped by PID)."""

import csv
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from configs import load_config
from meddiff.board import read_scalars
from meddiff.checkpoint import load_checkpoint
from sim.processes import free_port
from sim.run import simulate

TINY = ["federation.num_sites=2", "federation.min_train_nodes=2", "federation.local_steps=2", "data.num_samples=40",
        "data.image_size=16", "model.model_channels=8", "model.channel_mult=[1,2]", "model.attention_resolutions=[8]",
        "model.num_head_channels=8", "model.norm_groups=4", "output.num_samples=2", "sampler.num_inference_steps=2",
        "model.num_classes=2"]

# public pre-training, then sites that train and send attention and normalisation tensors only
PEFT = TINY + ["train.trainable=attention_norm", "pretraining.steps=2", "pretraining.batch_size=4"]


def _run(tmp_path: Path, name: str, overrides: list[str], resume_from: str = "") -> Path:
    cfg = load_config(None, overrides)
    return simulate(cfg, run_dir=tmp_path / name, resume_from=resume_from,
                    flwr_home=tmp_path / "flwr_home", timeout=300, http_port=free_port(), control_port=free_port())


def _alive_flower_processes(pids_file: Path) -> list[int]:
    pid = int(pids_file.read_text().split()[1])
    return [pid] if Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3] else []


@pytest.mark.slow
def test_two_sites_two_rounds_then_resume_equals_uninterrupted(tmp_path, capsys, monkeypatch, short_tmp):
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))  # where the run's Ray root goes
    full = _run(tmp_path, "full", PEFT + ["federation.num_rounds=2"])
    shown = capsys.readouterr().out
    # alive on screen: each site's progress, each server line once, no Flower/Ray noise
    assert "site_0 diffusion round 1/2: step" in shown and "site_1 diffusion round 2/2: step 2/2" in shown
    assert shown.count("[meddiff] round 1/2:") == 1 and "Manually terminating" not in shown and "INFO:" not in shown
    assert "configure_train: Sampled 2 nodes" in (full / "flower.log").read_text()  # all of it is kept in the run's log
    assert not list(short_tmp.glob("meddiff-ray-*"))  # the run's Ray root is removed
    scalars = read_scalars(full)
    assert [s for s, _ in scalars["global/eval_loss"]] == [1, 2] and "site_0/train_loss" in scalars
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["last.pt", "round_0001.pt", "round_0002.pt"]
    rows = list(csv.DictReader(open(full / "metrics.csv")))
    assert [r["round"] for r in rows if r["scope"] == "global"] == ["1", "2"]
    assert {r["scope"] for r in rows} >= {"site_0", "site_1", "global"}
    assert (full / "summary.md").is_file() and (full / "samples" / "round_0002.png").is_file()
    assert not _alive_flower_processes(full / "flower_pids.txt")

    last = load_checkpoint(full / "checkpoints" / "last.pt")
    initial = load_checkpoint(full / "public_pretraining" / "checkpoints" / "last.pt").ema
    assert any(not torch.equal(last.model[k], initial[k]) for k in initial)  # the global weights changed
    assert torch.equal(last.model["conv_in.weight"], initial["conv_in.weight"])  # ... but not the frozen ones
    assert "site_metrics" in last.extra and last.step == 2

    # stop after round 1, then resume: same final weights as the uninterrupted run
    first = _run(tmp_path, "first", PEFT + ["federation.num_rounds=1"])
    resumed = _run(tmp_path, "first", PEFT + ["federation.num_rounds=2"], resume_from=str(first / "checkpoints" / "round_0001.pt"))
    final = load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert final.step == 2
    for k in last.model:
        assert torch.equal(final.model[k], last.model[k]), k
        assert torch.equal(final.ema[k], last.ema[k]), k
    rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    assert [r["round"] for r in rows if r["scope"] == "global"] == ["1", "2"]


@pytest.mark.slow
def test_dp_study_extended_past_its_plan_is_refused_and_ends_cleanly_with_a_report(tmp_path):
    """Sites calibrate sigma for the planned 1 round; resuming to 3 rounds asks for more than the budget
    covers: both sites refuse round 2, the server stops sampling them and ends before round 3."""
    dp = TINY + ["privacy.enabled=true", "privacy.target_epsilon=8", "train.batch_size=8", "privacy.max_physical_batch_size=4",
                 "privacy.central_dp=fixed", "privacy.central_clipping_norm=0.5", "privacy.central_noise_multiplier=0.01",
                 "evaluation.every=2", "evaluation.num_samples=8", "evaluation.max_real=8",
                 "pretraining.steps=2", "pretraining.batch_size=4"]
    first = _run(tmp_path, "dp", dp + ["federation.num_rounds=1"])
    pretrained = first / "public_pretraining" / "checkpoints" / "last.pt"  # public pre-training ran first
    assert json.loads((first / "init_from.json").read_text())["path"] == str(pretrained.resolve())
    pretrained_at = pretrained.stat().st_mtime_ns
    ledgers = json.loads((first / "privacy" / "site_ledgers.json").read_text())["sites"]
    assert sorted(ledgers) == ["site_0", "site_1"]
    eps_round1 = {name: led["epsilon"] for name, led in ledgers.items()}
    assert all(0 < e <= 8 for e in eps_round1.values())
    assert (first / "privacy_report.md").is_file() and (first / "privacy_report.png").is_file()
    # the site's own ledger lives in its state dir; the server's copy equals it
    own = json.loads((first / "site_state" / "site_0" / "privacy_ledger.json").read_text())
    assert own["history"] == ledgers["site_0"]["history"]

    # the run is moved before it resumes: the sites' ledgers travel with it (none restarts at epsilon 0)
    moved = shutil.move(str(first), str(tmp_path / "dp_moved"))
    first = Path(moved)
    resumed = _run(tmp_path, "dp_moved", dp + ["federation.num_rounds=3"],
                   resume_from=str(first / "checkpoints" / "round_0001.pt"))
    assert (resumed / "public_pretraining" / "checkpoints" / "last.pt").stat().st_mtime_ns == pretrained_at  # not redone
    summary = json.loads((resumed / "summary.json").read_text())
    assert "stopped before round 3" in summary["stop_reason"] and "privacy budget" in summary["stop_reason"]
    rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    refused = [r for r in rows if r["round"] == "2" and r["scope"].startswith("site_") and r["budget_exhausted"] == "1"]
    assert len(refused) == 2 and all("refused" in r["reason"] for r in refused)
    assert not [r for r in rows if r["round"] == "3"]
    # the round-2 evaluation computed a federated FID from the sites' feature statistics
    global2 = [r for r in rows if r["round"] == "2" and r["scope"] == "global"][0]
    assert float(global2["fid"]) >= 0 and all(r["fid"] != "" for r in rows if r["round"] == "2" and r["eval_loss"])
    after = json.loads((resumed / "privacy" / "site_ledgers.json").read_text())
    assert {n: led["epsilon"] for n, led in after["sites"].items()} == eps_round1  # nobody trained past the budget
    assert sorted(after["refused"]) == ["site_0", "site_1"]
    assert not _alive_flower_processes(resumed / "flower_pids.txt")

    # the report, regenerated by the CLI, reproduces every epsilon from the ledger alone
    from sim.cli import main

    assert main(["privacy", "report", str(resumed)]) == 0
    report = json.loads((resumed / "privacy_report.json").read_text())
    for site in report["sites"]:
        acc = RDPAccountant()
        acc.history = [tuple(h) for h in site["history"]]
        assert acc.get_epsilon(site["delta"]) == pytest.approx(site["epsilon"], rel=1e-12)
        assert site["reported_matches_history"] and site["epsilon"] <= site["budget"]
    assert "does not cover" in (resumed / "privacy_report.md").read_text().lower()
    # central DP (user-level) ran alongside: one noisy release (round 1), none for the refused round 2
    assert report["central"]["releases"] == 1 and report["central"]["mode"] == "fixed" and report["central"]["epsilon"] > 0

    # the evaluation report of the federated checkpoint has a membership-inference audit per site
    from meddiff.cli import main as core_main

    assert core_main(["evaluate", "--checkpoint", str(resumed / "checkpoints" / "last.pt"), "--encoder", "pixels",
                      "--num", "8", "--no-progress"]) == 0
    evaluation = json.loads((resumed / "eval" / "eval.json").read_text())
    assert set(evaluation["membership_inference_per_site"]) == {"site_0", "site_1"}
