"""A site's segmentation utility on its own data: pairs unpacked from the site's packed examples,
one generated image per own training mask, the three arms and mask fidelity scored on its own
held-out pairs, deterministically for a seed."""

import pytest
import torch

from meddiff.data.phantoms import MASK_CHANNELS
from meddiff.recipes.phases import denoiser_phase
from meddiff.recipes.site_segmentation import site_pairs, site_segmentation, synthetic_pairs
from meddiff.recipes.sites import phantom_site
from tests.conftest import tiny_config

SITE = ["model.cond_channels=4", "data.num_samples=80", "evaluation.segmentation_steps=40",
        "evaluation.segmentation_samples=6", "evaluation.max_real=3", "sampler.num_inference_steps=2"]


@pytest.fixture(scope="module")
def site():
    cfg = tiny_config(extra=SITE)
    torch.manual_seed(0)
    weights = denoiser_phase(cfg).build_model(cfg).state_dict()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is several times faster on a busy machine (as a site runs)
    yield cfg, weights, phantom_site(0, 2, cfg, split="train"), phantom_site(0, 2, cfg, split="test")
    torch.set_num_threads(threads)


def test_site_pairs_unpack_the_packed_examples_into_images_masks_and_labels(site):
    cfg, _, train, _ = site
    (images, masks), labels, names = site_pairs(train, cfg)
    assert images.shape == (len(train), 1, 16, 16) and masks.shape == (len(train), 4, 16, 16)
    x0, y = train[3]
    assert torch.equal(images[3], x0[:1]) and torch.equal(masks[3] * 2 - 1, x0[1:]) and labels[3] == y
    assert names == MASK_CHANNELS and set(masks.unique().tolist()) == {0.0, 1.0}
    (few, _), _, _ = site_pairs(train, cfg, limit=4, seed=1)
    assert len(few) == 4 and all(any(torch.equal(f, i) for i in images) for f in few)
    with pytest.raises(ValueError, match="model.cond_channels is 0"):
        site_pairs(train, tiny_config())


def test_synthetic_pairs_are_conditioned_on_the_sites_own_training_masks(site):
    cfg, weights, train, _ = site
    real, labels, _ = site_pairs(train, cfg)
    model = denoiser_phase(cfg).build_model(cfg)
    model.load_state_dict(weights)
    images, masks = synthetic_pairs(model, cfg, real, labels, num=3, seed=4, device=torch.device("cpu"))
    assert images.shape == (3, 1, 16, 16) and images.abs().max() <= 1
    assert all(any(torch.equal(m, r) for r in real[1]) for m in masks)


def test_the_site_scores_three_arms_and_mask_fidelity_on_its_own_held_out_pairs(site):
    cfg, weights, train, test = site
    report = site_segmentation(cfg, weights, train, test, seed=7)
    assert (report["num_real_train"], report["num_synthetic"], report["num_real_test"]) == (len(train), 6, 3)
    assert set(report["arms"]) == {"real_only", "synthetic_only", "real_plus_synthetic"}
    assert report["settings"]["steps"] == 40 and report["seconds"] > 0
    regions = set(report["mask_fidelity"])
    assert {"brain", "whole_tumour", "tumour_core"} <= regions
    assert report["arms"]["real_only"]["brain"]["cases"] == 3
    assert report["arms"]["real_only"]["brain"]["dice"] > 0.5  # the site's real pairs teach the brain in 40 steps
    for scores in [*report["arms"].values(), report["mask_fidelity"]]:
        assert set(scores) == regions
        assert all(s["dice"] is None or 0.0 <= s["dice"] <= 1.0 for s in scores.values())
    again = site_segmentation(cfg, weights, train, test, seed=7)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in report.items() if k != "seconds"}
    with pytest.raises(ValueError, match="segmentation_steps is 0"):
        site_segmentation(tiny_config(extra=["model.cond_channels=4"]), weights, train, test, seed=7)
