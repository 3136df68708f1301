"""Segmentation utility of mask-conditioned synthesis: perfect synthetic pairs score like real
ones, useless ones score near zero, segmenters round-trip through a file, and the
`meddiff evaluate --task segmentation` command runs end to end on an NPZ and on a checkpoint."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from configs import config_to_dict
from meddiff.checkpoint import save_checkpoint
from meddiff.data.adapters import index_dataset
from meddiff.data.masked import MaskedVolumeDataset
from meddiff.cli import main
from meddiff.data.phantoms import make_phantoms
from meddiff.evaluate.segmentation import (SegmenterSettings, check_pairs, load_segmenter, region_dice, save_segmenter,
                                           segmentation_utility, train_segmenter)
from meddiff.recipes.build import build_unet
from meddiff.recipes.segmentation import real_mask_pairs
from tests.conftest import tiny_config
from tests.fixtures import make_brats

STEPS = 150


def _pairs(num, seed, size=32, lesion_fraction=0.5):
    images, _, masks = make_phantoms(num, size, seed=seed, lesion_fraction=lesion_fraction, masks=True)
    return torch.from_numpy(images)[:, None] * 2 - 1, torch.from_numpy(masks).float()


@pytest.fixture(scope="module")
def reports():
    """Two runs of the protocol on 32x32 phantoms: synthetic pairs that are real images with their
    true masks, and noise images with the masks of other phantoms."""
    real_train, real_test = _pairs(128, seed=0), _pairs(96, seed=1)
    perfect = _pairs(128, seed=2)  # drawn like the real pairs, from another stream
    noise = (torch.rand(perfect[0].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1, perfect[1].flip(0))
    settings = SegmenterSettings(steps=STEPS, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small convolutions run several times faster on one thread of a busy machine
    try:
        good, segmenters = segmentation_utility(real_train, perfect, real_test, settings=settings)
        bad, _ = segmentation_utility(real_train, noise, real_test, settings=settings, reference=segmenters["real_only"])
    finally:
        torch.set_num_threads(threads)
    return good, bad


def _dice(report, arm, region):
    return (report["mask_fidelity"] if arm == "fidelity" else report["arms"][arm])[region]["dice"]


def test_perfect_synthetic_pairs_score_like_real_ones(reports):
    good, _ = reports
    real, synth = _dice(good, "real_only", "whole_tumour"), _dice(good, "synthetic_only", "whole_tumour")
    assert real > 0.3 and synth > 0.3 and abs(synth - real) < 0.2, good["arms"]
    assert _dice(good, "real_only", "brain") > 0.9 and _dice(good, "synthetic_only", "brain") > 0.9
    assert _dice(good, "fidelity", "whole_tumour") > 0.3 and _dice(good, "fidelity", "brain") > 0.9, good["mask_fidelity"]
    with_tumour = int(_pairs(128, seed=2)[1][:, 1:].flatten(1).amax(1).sum())
    assert good["mask_fidelity"]["whole_tumour"]["cases"] == with_tumour and good["mask_fidelity"]["brain"]["cases"] == 128
    assert good["num_real_train"] == 128 and good["num_synthetic"] == 128 and good["num_real_test"] == 96
    json.dumps(good)  # JSON-able


def test_useless_synthetic_pairs_score_near_zero_and_below_perfect_ones(reports):
    good, bad = reports
    assert _dice(bad, "synthetic_only", "whole_tumour") < 0.15, bad["arms"]
    assert _dice(bad, "fidelity", "whole_tumour") < 0.1, bad["mask_fidelity"]
    assert _dice(bad, "synthetic_only", "whole_tumour") < 0.3 * _dice(good, "synthetic_only", "whole_tumour")
    assert _dice(bad, "fidelity", "whole_tumour") < 0.3 * _dice(good, "fidelity", "whole_tumour")
    assert _dice(bad, "synthetic_only", "whole_tumour") < _dice(bad, "real_only", "whole_tumour")
    assert bad["arms"]["real_only"] == good["arms"]["real_only"]  # same seed, same data: the same segmenter
    assert bad["fidelity_segmenter"] == "given"


def test_region_dice_counts_only_images_holding_the_region():
    target = torch.zeros(2, 4, 8, 8)
    target[:, 0, 1:7, 1:7] = 1  # brain in both
    target[0, 2, 3:5, 3:5] = 1  # oedema in the first only
    scores = region_dice(target.clone(), target, ("brain", "necrotic", "oedema", "enhancing"))
    assert scores["brain"] == {"dice": pytest.approx(1.0), "cases": 2}
    assert scores["oedema"]["cases"] == 1 and scores["whole_tumour"]["dice"] == pytest.approx(1.0)
    assert scores["necrotic"] == {"dice": None, "cases": 0}
    missed = target.clone()
    missed[:, 1:] = 0
    assert region_dice(missed, target, ("brain", "necrotic", "oedema", "enhancing"))["whole_tumour"]["dice"] == 0.0


def test_save_and_load_round_trip_exactly_and_training_is_deterministic(tmp_path):
    images, masks = _pairs(8, seed=3, size=16)
    settings = SegmenterSettings(steps=3, batch_size=4, seed=5)
    seg = train_segmenter(images, masks, settings=settings)
    again = train_segmenter(images, masks, settings=settings)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in seg.model.state_dict().items())
    loaded = load_segmenter(save_segmenter(tmp_path / "seg.pt", seg))
    assert loaded.settings == seg.settings and loaded.channel_names == seg.channel_names and loaded.info == seg.info
    state = loaded.model.state_dict()
    assert set(state) == set(seg.model.state_dict()) and all(torch.equal(v, state[k]) for k, v in seg.model.state_dict().items())
    assert torch.equal(loaded.predict(images), seg.predict(images))
    assert not any(p.requires_grad for p in loaded.model.parameters())
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_segmenter(tmp_path / "nope.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a meddiff segmenter"):
        load_segmenter(tmp_path / "other.pt")


def test_3d_pairs_train_a_3d_segmenter_and_bad_shapes_are_named():
    images, masks = torch.rand(3, 1, 8, 8, 8) * 2 - 1, (torch.rand(3, 2, 8, 8, 8) > 0.8).float()
    seg = train_segmenter(images, masks, settings=SegmenterSettings(steps=1, channels=(4, 8, 8)), channel_names=("a", "b"))
    assert seg.settings.spatial_dims == 3 and seg.predict(images).shape == (3, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="masks: shape"):
        check_pairs(images, masks[:, :, :4], "synthetic")
    with pytest.raises(ValueError, match=r"images: shape .* expected \[N, 1"):
        check_pairs(images.repeat(1, 2, 1, 1, 1), masks, "synthetic")
    with pytest.raises(ValueError, match="not divisible by 4"):
        train_segmenter(images[..., :6], masks[..., :6], settings=SegmenterSettings(steps=1))


def test_cli_scores_an_npz_of_pairs_and_names_bad_inputs(tmp_path, capsys):
    images, masks = _pairs(6, seed=4, size=16, lesion_fraction=1.0)
    np.savez(tmp_path / "pairs.npz", images=images.numpy(), masks=masks.numpy().astype(np.uint8))
    args = ["evaluate", "--task", "segmentation", "--seg-steps", "3", "--num-real-test", "8", "--no-progress", "--device", "cpu"]
    assert main(args + ["--synthetic", str(tmp_path / "pairs.npz")]) == 0
    printed = capsys.readouterr().out
    assert "| whole_tumour |" in printed and "mask fidelity" in printed
    report = json.loads((tmp_path / "segmentation.json").read_text())  # default: beside the NPZ
    assert report["num_synthetic"] == 6 and report["num_real_test"] == 8 and report["dataset"] == "phantoms"
    assert set(report["arms"]) == {"real_only", "synthetic_only", "real_plus_synthetic"}
    assert load_segmenter(report["segmenter_file"]).settings.steps == 3

    np.savez(tmp_path / "three.npz", images=images.numpy(), masks=masks[:, :3].numpy())
    np.savez(tmp_path / "noimages.npz", masks=masks.numpy())
    for name, message in (("three.npz", "'masks' has shape"), ("noimages.npz", "no array named 'images'"),
                          ("absent.npz", "file not found")):
        assert main(args + ["--synthetic", str(tmp_path / name), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and name in err, err
    assert main(["evaluate", "--task", "segmentation"]) == 2 and "--checkpoint" in capsys.readouterr().err
    assert main(["evaluate", "--synthetic", str(tmp_path / "pairs.npz")]) == 2  # the quality report needs a checkpoint
    assert "--task quality" in capsys.readouterr().err


def _checkpoint(tmp_path, extra):
    cfg = tiny_config(tmp_path, ["data.num_samples=16", *extra])
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    torch.manual_seed(0)  # every weight random (a fresh UNet's zero output layer ignores its condition)
    state = {k: torch.randn_like(v) * 0.1 if v.is_floating_point() else v for k, v in build_unet(cfg).state_dict().items()}
    save_checkpoint(path, model_state=state, config=config_to_dict(cfg), step=0)
    return path


def test_cli_generates_from_a_mask_conditioned_checkpoint(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, ["model.cond_channels=4"])
    args = ["evaluate", "--task", "segmentation", "--checkpoint", str(ckpt), "--num", "4", "--seg-steps", "2",
            "--num-real-test", "8", "--no-progress", "--device", "cpu"]
    assert main(args + ["--real-fraction", "0.25"]) == 0
    report = json.loads((tmp_path / "run" / "eval" / "segmentation.json").read_text())  # default: <run>/eval
    assert report["num_synthetic"] == 4 and report["num_real_train"] == 4 and report["num_real_available"] == 16
    assert report["mask_fidelity"]["whole_tumour"]["cases"] == 4  # the mask bank: a tumour in every mask
    pairs = np.load(tmp_path / "run" / "eval" / "generated_pairs.npz")  # kept for rescoring with --synthetic
    figure = np.asarray(Image.open(tmp_path / "run" / "eval" / "pairs.png"))  # 4 generated (1 row), 8 real (1 row)
    assert figure.shape == ((2 * 18 + 2) * 8, (8 * 18 + 2) * 8, 3)  # 16x16 tiles, 2-pixel gaps, 8x upscaled
    assert pairs["images"].shape == (4, 1, 16, 16) and pairs["masks"].shape == (4, 4, 16, 16)
    saved = report["segmenter_file"]
    assert main(args + ["--segmenter", saved, "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "segmentation.json").read_text())["fidelity_segmenter"] == saved
    guided = tmp_path / "guided"
    assert main(args + ["--guidance-scale", "2", "--ddim-steps", "3", "--out", str(guided)]) == 0
    sampler = json.loads((guided / "segmentation.json").read_text())["sampler"]
    assert (sampler["guidance_scale"], sampler["num_inference_steps"]) == (2.0, 3)
    assert not np.allclose(np.load(guided / "generated_pairs.npz")["images"], pairs["images"])
    capsys.readouterr()
    assert main(args + ["--real-fraction", "0"]) == 2 and "--real-fraction" in capsys.readouterr().err
    assert main(args + ["--guidance-scale", "-1"]) == 2 and "sampler.guidance_scale" in capsys.readouterr().err
    assert main(args + ["--synthetic", str(guided / "generated_pairs.npz"), "--ddim-steps", "3"]) == 2
    assert "already generated" in capsys.readouterr().err
    plain = _checkpoint(tmp_path / "plain", [])
    assert main(["evaluate", "--task", "segmentation", "--checkpoint", str(plain), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.cond_channels=0" in err and str(plain) in err


def test_a_brats_folder_splits_into_training_and_held_out_patients(tmp_path):
    make_brats(tmp_path / "brats", n_cases=5, sequences=("t1c",))
    cfg = tiny_config(extra=["data.dataset=brats", f"data.path={tmp_path / 'brats'}", "model.cond_channels=4",
                             "data.min_foreground=0.05"])
    (train_x, train_m), (test_x, test_m) = real_mask_pairs(cfg, num_test=8, seed=0)
    per_patient = len(MaskedVolumeDataset(index_dataset(cfg.data).records[:1], cfg.data).images)
    assert len(test_x) == per_patient and len(train_x) == 4 * per_patient  # 1 of 5 patients held out, equal cases
    assert train_x.shape[1:] == (1, 16, 16) and test_m.shape[1:] == train_m.shape[1:] == (4, 16, 16)
    assert set(torch.unique(train_m).tolist()) <= {0.0, 1.0}
    one = tiny_config(extra=["data.dataset=brats", f"data.path={tmp_path / 'one'}", "model.cond_channels=4"])
    make_brats(tmp_path / "one", n_cases=1, sequences=("t1c",))
    with pytest.raises(ValueError, match="at least 2 patients"):
        real_mask_pairs(one, num_test=8)


def test_generation_masks_put_tumour_bearing_masks_first_in_a_seeded_order():
    from meddiff.recipes.segmentation import tumours_first

    masks = torch.zeros(6, 4, 8, 8)
    masks[:, 0, 2:6, 2:6] = 1  # every mask has brain
    masks[[1, 4], 2, 3:5, 3:5] = 1  # oedema in two
    masks[3, 3, 4, 4] = 1  # enhancing in one
    ordered = tumours_first(masks, seed=0)
    assert ordered.shape == masks.shape
    assert ordered[:3, 1:].flatten(1).any(1).all() and not ordered[3:, 1:].any()
    assert torch.equal(ordered, tumours_first(masks, seed=0))
    assert sorted(m.sum().item() for m in ordered) == sorted(m.sum().item() for m in masks)
