"""A federated mask-conditioned study: sites train the mask_diffusion phase on their (image, mask)
pairs, with and without DP, through the server's round loop and the real ClientApp in process."""

import json

import pytest
import torch

from meddiff.checkpoint import load_checkpoint
from meddiff.recipes.phases import MASK_DIFFUSION
from meddiff.recipes.sites import phantom_site
from server.federation import run_federation
from tests.conftest import tiny_config
from tests.flower_helpers import as_node
from tests.inprocess_grid import InProcessGrid

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
