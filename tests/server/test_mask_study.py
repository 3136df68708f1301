"""A federated mask-conditioned study: sites train the mask_diffusion phase on their (image, mask)
pairs, with and without DP, through the server's round loop and the real ClientApp in process."""

import csv
import json

import pytest
import torch

from meddiff.board import read_scalars
from meddiff.checkpoint import load_checkpoint
from meddiff.recipes.phases import MASK_DIFFUSION
from meddiff.recipes.sites import phantom_site
from server.federation import run_federation
from tests.conftest import tiny_config
from tests.flower_helpers import as_node
from tests.inprocess_grid import InProcessGrid

SEGMENT = ["evaluation.segmentation_steps=3", "evaluation.segmentation_samples=2", "evaluation.max_real=4"]

MASKS = ["model.cond_channels=4", "federation.num_sites=2", "federation.min_train_nodes=2", "federation.num_rounds=2",
         "federation.local_steps=2", "data.num_samples=40", "output.num_samples=2", "sampler.num_inference_steps=2",
         "model.num_classes=2"]


def _study(tmp_path, extra=()):
    cfg = tiny_config(tmp_path, MASKS + list(extra))
    as_node(0)
    grid = InProcessGrid({100 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)})
    return run_federation(grid, cfg, run_dir=tmp_path / "run"), cfg


def test_a_site_of_a_mask_study_trains_on_its_images_packed_with_their_masks(tmp_path):
    cfg = tiny_config(tmp_path, MASKS)
    x0, _ = phantom_site(0, 2, cfg)[0]
    assert x0.shape == (1 + 4, cfg.data.image_size, cfg.data.image_size)
    assert set(torch.unique(x0[1:]).tolist()) <= {-1.0, 1.0}  # the mask as a condition
    plain, _ = phantom_site(0, 2, tiny_config(tmp_path, [m for m in MASKS if "cond_channels" not in m]))[0]
    assert torch.equal(plain, x0[:1])  # the same image, with or without its mask


@pytest.mark.slow
@pytest.mark.parametrize("private", [False, True])
def test_a_federated_mask_study_trains_the_mask_phase_and_checkpoints_a_conditioned_model(tmp_path, private):
    extra = ["privacy.enabled=true", "privacy.target_epsilon=50", "train.batch_size=8"] if private else []
    summary, cfg = _study(tmp_path, extra)
    assert summary["status"] == "completed", summary["stop_reason"]
    assert [r["phase"] for r in summary["rounds"]] == [MASK_DIFFUSION.name] * 2
    assert [r["accepted"] for r in summary["rounds"]] == [2, 2]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt.extra.get("phase") == MASK_DIFFUSION.name
    assert ckpt.model["conv_in.weight"].shape[1] == 1 + 4  # x_t and the 4 mask channels
    assert summary["samples"] and (tmp_path / "run" / "samples" / "round_0002.png").is_file()
    if private:
        eps = summary["epsilon"]
        assert set(eps) == {"site_0", "site_1"} and all(0 < e <= 50 for e in eps.values())
        report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
        assert MASK_DIFFUSION.name in json.dumps(report)


LATENT = ["autoencoder.enabled=true", "autoencoder.mode=not_private", "autoencoder.channels=[8,16]", "autoencoder.norm_groups=4",
          "autoencoder.latent_channels=2", "model.in_channels=2", "model.out_channels=2", "model.attention_resolutions=[4]",
          "autoencoder.batch_size=8", "autoencoder.num_rounds=1", "autoencoder.local_steps=2"]


@pytest.mark.slow
def test_a_federated_latent_mask_study_trains_the_autoencoder_then_the_mask_phase_on_latents_under_dp(tmp_path):
    from meddiff.recipes.phases import AUTOENCODER

    extra = LATENT + ["privacy.enabled=true", "privacy.unit=record", "privacy.target_epsilon=50", "train.batch_size=8",
                      "privacy.max_physical_batch_size=4", "train.lesion_weight=3", "federation.num_rounds=1"]
    summary, cfg = _study(tmp_path, extra)
    assert summary["status"] == "completed", summary["stop_reason"]
    assert [(r["phase"], r["accepted"]) for r in summary["rounds"]] == [(AUTOENCODER.name, 2), (MASK_DIFFUSION.name, 2)]
    assert summary["latent_diffusion"] and summary["autoencoder"]["weight_transfers"] == 2
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt.extra.get("phase") == MASK_DIFFUSION.name and "autoencoder" in ckpt.extra
    assert ckpt.model["conv_in.weight"].shape[1] == 2 + 4  # the latent and the 4 mask channels on its grid
    assert (tmp_path / "run" / "samples" / "round_0001.png").is_file()  # decoded samples of the study's masks
    assert set(summary["epsilon"]) == {"site_0", "site_1"} and all(0 < e <= 50 for e in summary["epsilon"].values())


@pytest.mark.slow  # two rounds of a mask study, each followed by the sites' segmentation evaluation
def test_each_site_reports_its_segmentation_utility_on_its_own_data(tmp_path, capsys):
    """segmentation_every=1 over 2 rounds: an entry after each round (the last one once), one
    metrics.csv row per site with the whole-tumour Dice of each column, TensorBoard, the summaries."""
    summary, _ = _study(tmp_path, SEGMENT + ["evaluation.segmentation_every=1"])
    assert summary["status"] == "completed", summary["stop_reason"]
    entries = summary["segmentation"]
    assert [(e["phase"], e["round"]) for e in entries] == [(MASK_DIFFUSION.name, 1), (MASK_DIFFUSION.name, 2)]
    final = entries[-1]
    assert final["region"] == "whole_tumour" and final["segmenter_steps"] == 3 and set(final["sites"]) == {"site_0", "site_1"}
    for site in final["sites"].values():
        assert site["num_synthetic"] == 2 and 0 < site["num_real_test"] <= 4 and site["num_real_train"] > 4
        assert set(site["scores"]) == {"real_only", "synthetic_only", "real_plus_synthetic", "mask_fidelity"}
        assert site["scores"]["real_only"]["brain"]["cases"] == site["num_real_test"]
    run = tmp_path / "run"
    rows = [r for r in csv.DictReader(open(run / "metrics.csv"))  # neither a training nor a held-out-loss row
            if r["scope"].startswith("site_") and r["accepted"] == "" and r["eval_loss"] == ""]
    assert sorted((r["round"], r["scope"]) for r in rows) == [("1", "site_0"), ("1", "site_1"), ("2", "site_0"), ("2", "site_1")]
    for r in rows:
        scores = entries[int(r["round"]) - 1]["sites"][r["scope"]]["scores"]
        for column in ("real_only", "synthetic_only", "real_plus_synthetic", "mask_fidelity"):
            dice = scores[column]["whole_tumour"]["dice"]
            assert r[f"seg_{column}"] == ("" if dice is None else f"{dice:.6g}")
        assert r["num_examples"] == str(entries[0]["sites"][r["scope"]]["num_real_test"]) and r["steps"] == ""
    tags = read_scalars(run)
    assert [s for s, _ in tags["site_1/segmentation/real_only/brain"]] == [1, 2]
    assert "| site_0 |" in (run / "summary.md").read_text()
    out = capsys.readouterr().out
    assert "segmentation utility after mask_diffusion round 2: whole tumour Dice" in out and "| site_1 |" in out
