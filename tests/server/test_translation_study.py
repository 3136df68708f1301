"""A federated translation study: sites train the translation phases on their (target, source)
pairs through the server's round loop and the real ClientApp in process, with and without DP."""

import csv

import pytest
import torch

from meddiff.checkpoint import load_checkpoint
from meddiff.recipes.phases import TRANSLATION, TRANSLATION_REGRESSION
from server.federation import run_federation
from tests.conftest import tiny_config
from tests.flower_helpers import as_node
from tests.inprocess_grid import InProcessGrid

STUDY = ["data.source_sequence=t1", "data.target_sequence=ct", "federation.num_sites=2", "federation.min_train_nodes=2",
         "federation.num_rounds=2", "federation.local_steps=2", "data.num_samples=40", "diffusion.prediction_type=v",
         "evaluation.translation_examples=4", "sampler.num_inference_steps=3"]


@pytest.mark.parametrize("phase, extra", [
    pytest.param(TRANSLATION, [], marks=pytest.mark.slow),  # ~20-35 s each on a loaded 2-core machine
    pytest.param(TRANSLATION_REGRESSION, ["train.translation_objective=regression", "privacy.enabled=true",
                                          "privacy.target_epsilon=50", "train.batch_size=8"], marks=pytest.mark.slow),
])
def test_a_federated_translation_study_trains_its_phase_and_checkpoints_a_source_conditioned_model(tmp_path, phase, extra):
    cfg = tiny_config(tmp_path, STUDY + extra)
    as_node(0)
    grid = InProcessGrid({100 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)})
    summary = run_federation(grid, cfg, run_dir=tmp_path / "run")
    assert summary["status"] == "completed", summary["stop_reason"]
    assert [r["phase"] for r in summary["rounds"]] == [phase.name] * 2
    assert [r["accepted"] for r in summary["rounds"]] == [2, 2]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt.extra.get("phase") == phase.name
    assert ckpt.model["conv_in.weight"].shape[1] == 2  # x_t and the source image
    assert summary["samples"] is None  # no unconditional sample grids for a translation model
    # every round each site scores its own held-out pairs (numbers only), in metrics.csv and summary.md
    last = summary["rounds"][-1]
    assert set(last["translation_per_site"]) == {"site_0", "site_1"} and -1 <= last["translation_ssim"] <= 1
    assert all(s["translation_mae"] > 0 for s in last["translation_per_site"].values())  # MAE in HU
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert sum(bool(r["translation_ssim"]) for r in rows if r["scope"].startswith("site_")) == 4  # 2 sites x 2 rounds
    assert "| site_1 |" in (tmp_path / "run" / "summary.md").read_text()
    if cfg.privacy.enabled:
        assert set(summary["epsilon"]) == {"site_0", "site_1"} and all(0 < e <= 50 for e in summary["epsilon"].values())


LATENT = ["autoencoder.enabled=true", "autoencoder.mode=not_private", "autoencoder.channels=[8,16]", "autoencoder.norm_groups=4",
          "autoencoder.latent_channels=2", "model.in_channels=2", "model.out_channels=2", "model.attention_resolutions=[4]",
          "autoencoder.batch_size=8", "autoencoder.num_rounds=1", "autoencoder.local_steps=2"]


@pytest.mark.slow  # an autoencoder round, two translation rounds on latents, then a translation through the codec
def test_a_latent_translation_study_encodes_target_and_source_and_translates_through_the_autoencoder(tmp_path):
    from meddiff.recipes.phases import AUTOENCODER  # only this test needs them
    from meddiff.recipes.translation_eval import load_translator

    cfg = tiny_config(tmp_path, STUDY + LATENT)
    as_node(0)
    grid = InProcessGrid({100 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)})
    summary = run_federation(grid, cfg, run_dir=tmp_path / "run")
    assert summary["status"] == "completed", summary["stop_reason"]
    assert [r["phase"] for r in summary["rounds"]] == [AUTOENCODER.name] + [TRANSLATION.name] * 2
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt.model["conv_in.weight"].shape[1] == 4  # the latent x_t (2) and the encoded source (2)
    _, _, phase, translate = load_translator(tmp_path / "run" / "checkpoints" / "last.pt", "cpu")
    source = torch.rand(3, 1, 16, 16) * 2 - 1
    out = translate(source, samples=2)
    assert phase is TRANSLATION and out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()  # decoded to the image grid


def test_a_perfect_site_translation_keeps_its_infinite_psnr_in_the_summary_table():
    from server.summary import _translation_table, translation_scores  # the summary's table alone

    site = translation_scores({"translation_ssim": 1.0, "translation_psnr": float("inf"), "translation_mae": 0.0})
    assert site["translation_psnr"] == float("inf")
    assert translation_scores({"translation_ssim": float("nan"), "translation_psnr": float("nan"),
                               "translation_mae": float("nan")}) == {}  # no translation in this study
    table = _translation_table(tiny_config(None, STUDY), [{"phase": "translation", "round": 1,
                                                           "translation_per_site": {"site_0": site}}])
    assert "| translation | 1 | site_0 | 1.000 | inf | 0 |" in table and "MAE in HU" in table[1]
