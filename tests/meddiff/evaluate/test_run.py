"""End to end: evaluate a trained checkpoint, train the domain encoder, plot a run, and the
membership-inference sanity checks on a really overfit model."""

import json

import numpy as np
import pytest
import torch

from meddiff.recipes.build import build_diffusion, build_unet_from_section
from meddiff.cli import main
from meddiff.data import PhantomDataset
from meddiff.evaluate import diffusion_losses, membership_inference
from meddiff.train import cycle, train_loop
from tests.conftest import tiny_config


def test_mia_is_near_chance_for_one_distribution_and_near_one_for_an_overfit_model():
    cfg = tiny_config(extra=["model.num_classes=0", "train.lr=3e-3"])
    torch.manual_seed(0)
    model = build_unet_from_section(cfg.model, 16)
    diffusion = build_diffusion(cfg.diffusion)
    members = PhantomDataset(16, 16, seed=1)
    others = PhantomDataset(16, 16, seed=2)
    fresh = diffusion_losses(model, diffusion, members), diffusion_losses(model, diffusion, others)
    untrained = membership_inference(*fresh)
    assert 0.3 < untrained["mia_auc"] < 0.7  # an untrained model cannot tell them apart
    loader = torch.utils.data.DataLoader(members, batch_size=16, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train_loop(model=model, objective=diffusion, optimizer=opt, batches=cycle(loader), steps=400,
               device=torch.device("cpu"), noise_multiplicity=4, progress=False)
    overfit = membership_inference(diffusion_losses(model, diffusion, members), diffusion_losses(model, diffusion, others))
    assert overfit["mia_auc"] > 0.9, overfit


@pytest.mark.slow
def test_evaluate_train_encoder_and_plot_commands(tmp_path):
    overrides = ["data.image_size=16", "data.num_samples=96", "model.model_channels=8", "model.channel_mult=[1,2]",
                 "model.attention_resolutions=[8]", "model.num_head_channels=8", "model.norm_groups=4", "model.num_classes=2",
                 "train.steps=30", "train.batch_size=16", "output.num_samples=4", "sampler.num_inference_steps=4",
                 f"output.root={tmp_path}", "output.name=run", "train.log_every=10"]
    assert main(["train", "--no-progress", *overrides]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    enc = tmp_path / "encoder.pt"
    assert main(["train-encoder", "--out", str(enc), "--steps", "40", "--no-progress", *overrides]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--encoder", "domain", "--encoder-weights", str(enc), "--num", "32",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert np.isfinite(report["fid"]) and 0 <= report["precision"] <= 1 and 0 <= report["membership_inference"]["mia_auc"] <= 1
    assert set(report["per_class_fid"]) == {"0", "1"} and "domain CNN encoder.pt" in report["encoder"]
    assert {"tstr_accuracy", "trtr_accuracy", "real_plus_synthetic_accuracy"} <= set(report["utility"])
    for name in ("eval.md", "samples.png", "nearest_pairs.png", "precision_recall.png"):
        assert (out / name).is_file(), name
    # an Inception request without weights is a clear error, not a download
    assert main(["evaluate", "--checkpoint", str(ckpt), "--encoder", "inception", "--out", str(out)]) == 2


def test_plot_draws_loss_and_epsilon_against_round(tmp_path):
    from meddiff.recipes.runs import MetricsCSV

    fields = ["round", "scope", "accepted", "train_loss", "eval_loss", "epsilon"]
    with MetricsCSV(tmp_path / "metrics.csv", fields) as m:
        for rnd in (1, 2, 3):
            for site in (0, 1):
                m.write({"round": rnd, "scope": f"site_{site}", "accepted": 1, "train_loss": 1 / rnd, "epsilon": rnd * (site + 1)})
            m.write({"round": rnd, "scope": "global", "train_loss": 1 / rnd, "eval_loss": 1.1 / rnd})
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "plots.png").stat().st_size > 1000
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_a_metrics_file_with_fewer_columns_is_widened_keeping_its_rows(tmp_path):
    import csv

    from meddiff.recipes.runs import MetricsCSV

    with MetricsCSV(tmp_path / "metrics.csv", ["round", "scope"]) as m:
        m.write({"round": 1, "scope": "global"})
    with MetricsCSV(tmp_path / "metrics.csv", ["round", "scope", "seg_real_only"]) as m:  # a resumed run, newer columns
        m.write({"round": 2, "scope": "site_0", "seg_real_only": 0.5})
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert rows == [{"round": "1", "scope": "global", "seg_real_only": ""},
                    {"round": "2", "scope": "site_0", "seg_real_only": "0.5"}]


def test_tstr_on_separable_toy_classes_and_on_useless_synthetic_data():
    from meddiff.evaluate.utility import downstream_utility

    torch.manual_seed(0)

    def make(n, flip=False):
        y = torch.arange(n) % 2
        x = torch.randn(n, 1, 16, 16) * 0.3
        x[:, :, :8] += (y.float() * 2 - 1).view(-1, 1, 1, 1) * (-1 if flip else 1)  # class = brightness of the top half
        return x.clamp(-1, 1), y

    real_train, real_test = make(128), make(128)
    good = downstream_utility(real_train=real_train, synthetic=make(128), real_test=real_test, num_classes=2, steps=60)
    bad = downstream_utility(real_train=real_train, synthetic=make(128, flip=True), real_test=real_test, num_classes=2, steps=60)
    assert good["trtr_accuracy"] > 0.95 and good["tstr_accuracy"] > 0.95
    assert bad["tstr_accuracy"] < 0.1  # synthetic images with swapped labels teach the opposite rule
