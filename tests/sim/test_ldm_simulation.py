"""Latent diffusion trained federated in two phases, end to end on Flower's simulation engine."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from configs import load_config
from meddiff.checkpoint import load_checkpoint
from meddiff.data.template import write_template_cohort
from sim.processes import free_port
from sim.run import simulate
from tests.conftest import REPO, shared_file

TINY_3D = ["federation.num_sites=2", "federation.min_train_nodes=2", "federation.num_rounds=1", "federation.local_steps=2",
           "autoencoder.num_rounds=1", "autoencoder.local_steps=2", "autoencoder.batch_size=2", "autoencoder.channels=[8,16]",
           "autoencoder.norm_groups=4", "autoencoder.latent_channels=2", "model.in_channels=2", "model.out_channels=2",
           "model.model_channels=8", "model.channel_mult=[1,2]", "model.attention_resolutions=[4]", "model.num_head_channels=8",
           "model.norm_groups=4", "data.image_size=16", "data.target_spacing=[12,12,12]", "train.batch_size=2",
           "privacy.max_physical_batch_size=2", "output.num_samples=2", "sampler.num_inference_steps=2"]


def _run(tmp_path: Path, name: str, config, overrides: list[str], resume_from: str = "") -> Path:
    cfg = load_config(config, overrides)
    return simulate(cfg, run_dir=tmp_path / name, resume_from=resume_from,
                    flwr_home=tmp_path / "flwr_home", timeout=600, http_port=free_port(), control_port=free_port())


@pytest.mark.slow
def test_3d_brain_ldm_two_phases_with_dp_in_both_on_mni152_volumes(tmp_path):
    """configs/ldm3d.yaml at a tiny size: 2 sites with their own scanners, 1 round per phase, DP in both."""
    cohort = tmp_path / "cohort"
    write_template_cohort(shared_file("mni152_t1_1mm.nii.gz"), cohort, num_patients=10, spacing=12.0, seed=0)
    overrides = TINY_3D + [f"data.path={cohort}", f"data.cache_dir={tmp_path / 'cache'}"]
    run = _run(tmp_path, "ldm3d", REPO / "configs" / "ldm3d.yaml", overrides)

    summary = json.loads((run / "summary.json").read_text())
    assert [(r["phase"], r["round"], r["accepted"]) for r in summary["rounds"]] == [("autoencoder", 1, 2), ("diffusion", 1, 2)]
    assert summary["latent_diffusion"] and summary["autoencoder"]["mode"] == "dp" and summary["autoencoder"]["scale_factor"] > 0
    assert summary["autoencoder"]["weight_transfers"] == 2  # the frozen autoencoder went to each site once, not every round
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(site["acquisition"] for site in manifest["sites"])  # per-site scanner shift
    assert {s["patient"] for s in manifest["sites"][0]["train"]["samples"]}.isdisjoint(
        {s["patient"] for s in manifest["sites"][1]["train"]["samples"]})  # volumes split by patient

    # NIfTI samples that nibabel reopens with the expected RAS affine at the configured spacing
    volumes = sorted((run / "samples").glob("round_0001_*.nii.gz"))
    assert len(volumes) == 2
    img = nib.load(volumes[0])
    assert img.shape == (16, 16, 16) and np.isfinite(img.get_fdata()).all()
    assert np.allclose(img.header.get_zooms(), (12.0, 12.0, 12.0))
    assert np.allclose(img.affine[:3, :3], np.diag([12.0, 12.0, 12.0]))
    assert np.allclose(img.affine[:3, 3], -0.5 * 15 * 12.0)  # centred on the origin
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")

    # one ledger per site holding both phases, composed in one accountant history within the budget
    for site in ("site_0", "site_1"):
        ledger = json.loads((run / "site_state" / site / "privacy_ledger.json").read_text())
        assert [r["phase"] for r in ledger["rounds"]] == ["autoencoder", "diffusion"]
        assert sum(n for _, _, n in ledger["history"]) == 4
        assert set(ledger["calibrations"][0]["phases"]) == {"autoencoder", "diffusion"}
        acc = RDPAccountant()
        acc.history = [tuple(h) for h in ledger["history"]]
        assert acc.get_epsilon(ledger["delta"]) == pytest.approx(ledger["epsilon"], rel=1e-12)
        assert ledger["epsilon"] <= 10.0
    report = json.loads((run / "privacy_report.json").read_text())
    assert [p["phase"] for p in report["phases"]] == ["autoencoder", "diffusion"] and all(p["private"] for p in report["phases"])
    assert report["sites"][0]["steps_by_phase"] == {"autoencoder": 2, "diffusion": 2}
    assert "decoder included" in (run / "privacy_report.md").read_text()

    # checkpoints of both phases; the diffusion ones carry the autoencoder, so sampling needs nothing else
    assert (run / "checkpoints" / "ae_round_0001.pt").is_file() and (run / "checkpoints" / "round_0001.pt").is_file()
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last.extra["phase"] == "diffusion" and last.extra["autoencoder"]["scale_factor"] == summary["autoencoder"]["scale_factor"]
    from meddiff.cli import main

    assert main(["sample", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--num", "1", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "s")]) == 0
    sample = nib.load(next((tmp_path / "s").glob("*.nii.gz")))
    assert np.allclose(sample.header.get_zooms(), (12.0, 12.0, 12.0))
    assert main(["sample", "--checkpoint", str(run / "checkpoints" / "ae_round_0001.pt"), "--num", "1", "--no-progress",
                 "--out", str(tmp_path / "s2")]) == 2  # a phase-1 checkpoint holds no denoiser: a clear error


LDM_2D = ["federation.num_sites=2", "federation.min_train_nodes=2", "federation.local_steps=2", "federation.num_rounds=1",
          "data.num_samples=40", "data.image_size=16", "model.model_channels=8", "model.channel_mult=[1,2]",
          "model.attention_resolutions=[4]", "model.num_head_channels=8", "model.norm_groups=4", "output.num_samples=2",
          "sampler.num_inference_steps=2", "autoencoder.enabled=true", "autoencoder.mode=not_private",
          "autoencoder.channels=[8,16]", "autoencoder.norm_groups=4", "autoencoder.latent_channels=2", "model.in_channels=2",
          "model.out_channels=2", "autoencoder.num_rounds=1", "autoencoder.local_steps=2", "autoencoder.batch_size=8"]


@pytest.mark.slow
def test_ldm_resumed_from_its_phase1_checkpoint_equals_the_uninterrupted_run_and_public_first_stage(tmp_path):
    full = _run(tmp_path, "full", None, LDM_2D)
    rows = list(csv.DictReader(open(full / "metrics.csv")))
    assert {(r["phase"], r["round"]) for r in rows if r["scope"] == "global"} == {("autoencoder", "1"), ("diffusion", "1")}
    assert "NOT private" in (full / "summary.md").read_text() or "not private" in (full / "summary.md").read_text()
    resumed = _run(tmp_path, "resumed", None, LDM_2D, resume_from=str(full / "checkpoints" / "ae_round_0001.pt"))
    a, b = load_checkpoint(full / "checkpoints" / "last.pt"), load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert a.extra["autoencoder"]["sha256"] == b.extra["autoencoder"]["sha256"]
    assert a.extra["autoencoder"]["scale_factor"] == pytest.approx(b.extra["autoencoder"]["scale_factor"], rel=1e-12)
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    # autoencoder.mode=public: the server loads a first stage (here the one trained above) and sends it;
    # no phase-1 rounds, no site statistics (the scale factor comes with it)
    public = _run(tmp_path, "public", None, LDM_2D + ["autoencoder.mode=public",
                                                      f"autoencoder.checkpoint={full / 'checkpoints' / 'last.pt'}"])
    summary = json.loads((public / "summary.json").read_text())
    assert [r["phase"] for r in summary["rounds"]] == ["diffusion"] and summary["autoencoder"]["mode"] == "public"
    assert summary["autoencoder"]["digest"] == a.extra["autoencoder"]["sha256"]
    assert "pre-trained on public data" in (public / "summary.md").read_text()
