"""Mask-conditioned synthesis end to end: `meddiff train` on images packed with their masks (the
mask_diffusion phase), then `meddiff sample` from given masks, the held-out mask bank or rule-placed tumours."""

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.checkpoint import load_checkpoint
from meddiff.cli import main
from meddiff.data import make_phantoms
from meddiff.outputs import label_map, write_pairs
from meddiff.recipes.build import build_unet
from meddiff.recipes.centralized import train_centralized
from meddiff.recipes.sample import sample_images
from meddiff.recipes.masks import lesion_rule_masks, load_masks, mask_bank, masks_to_sample
from meddiff.sampling.guidance import classifier_free_output
from tests.conftest import tiny_config, tiny_unet


@pytest.mark.slow  # a short centralized run, then two sampling runs
def test_train_on_masks_then_generate_one_image_per_mask(tmp_path, capsys):
    cfg = tiny_config(tmp_path, ["model.cond_channels=4", "data.num_samples=16", "output.num_samples=2"])
    run = train_centralized(cfg, progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt.model["conv_in.weight"].shape[1] == 1 + 4  # x_t + brain, necrotic, oedema, enhancing
    plain = build_unet(tiny_config()).state_dict()  # the default study's network
    assert set(plain) == set(ckpt.model) and plain["conv_in.weight"].shape[1] == 1
    assert all(v.shape == ckpt.model[k].shape for k, v in plain.items() if k != "conv_in.weight")  # wider only at its input

    _, _, given = make_phantoms(3, 32, seed=99, lesion_fraction=1.0, masks=True)  # 32 px: resized to the model's 16
    np.savez(tmp_path / "given.npz", masks=given)
    args = ["sample", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--steps", "2", "--no-progress"]
    assert main(args + ["--masks", str(tmp_path / "given.npz"), "--out", str(tmp_path / "given")]) == 0
    pairs = np.load(next((tmp_path / "given").glob("*_pairs.npz")))
    assert pairs["images"].shape == (3, 1, 16, 16) and pairs["masks"].shape == (3, 4, 16, 16)
    mask_png = np.asarray(Image.open(next((tmp_path / "given").glob("*_002_mask.png"))))
    assert np.array_equal(mask_png, label_map(pairs["masks"][2])) and mask_png.max() == 4
    assert np.asarray(Image.open(next((tmp_path / "given").glob("*_002_image.png")))).shape == (16, 16)
    assert main(args + ["--num", "2", "--out", str(tmp_path / "bank")]) == 0  # no masks: the held-out bank
    bank = np.load(next((tmp_path / "bank").glob("*_pairs.npz")))
    assert np.array_equal(bank["masks"], mask_bank(cfg, 2).numpy().astype(np.uint8))
    assert main(args + ["--num", "2", "--lesion-rules", "--lesion-radius", "1,2", "--out", str(tmp_path / "rules")]) == 0
    rules = np.load(next((tmp_path / "rules").glob("*_pairs.npz")))
    assert np.array_equal(rules["masks"], lesion_rule_masks(cfg, 2, radius=(1.0, 2.0)).numpy().astype(np.uint8))
    assert main(["sample", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--masks", str(tmp_path / "nope.txt")]) == 2
    assert "expected an .npz file" in capsys.readouterr().err


def test_mask_bank_is_held_out_and_every_mask_has_a_tumour(tmp_path):
    cfg = tiny_config(extra=["model.cond_channels=4"])
    bank = mask_bank(cfg, 6, seed=1)
    assert bank.shape == (6, 4, 16, 16) and bank[:, 1:].flatten(1).amax(1).min() == 1
    _, _, train = make_phantoms(cfg.data.num_samples, 16, seed=cfg.data.seed, masks=True)
    assert not any(np.array_equal(b, t) for b in bank.numpy().astype(np.uint8) for t in train)
    assert not torch.equal(bank, mask_bank(cfg, 6, seed=2))


def test_given_masks_are_checked(tmp_path):
    cfg = tiny_config(extra=["model.cond_channels=4"])
    np.savez(tmp_path / "three.npz", masks=np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"expected \[N, 4, S, S\]"):
        load_masks(tmp_path / "three.npz", cfg)
    np.savez(tmp_path / "soft.npz", masks=np.full((2, 4, 16, 16), 0.5, np.float32))
    with pytest.raises(ValueError, match="only 0 and 1"):
        load_masks(tmp_path / "soft.npz", cfg)
    (tmp_path / "dir").mkdir()
    for i in range(2):
        np.save(tmp_path / "dir" / f"m{i}.npy", np.ones((4, 16, 16), np.uint8) * i)
    assert torch.equal(load_masks(tmp_path / "dir", cfg)[:, 0, 0, 0], torch.tensor([0.0, 1.0]))


def test_sampling_masks_come_from_the_bank_or_from_rules(tmp_path):
    phantoms = tiny_config(extra=["model.cond_channels=4"])
    assert torch.equal(masks_to_sample(phantoms, 3, seed=1), mask_bank(phantoms, 3, seed=1))
    ruled = masks_to_sample(phantoms, 3, seed=1, rules=True, radius=(1.0, 2.0))
    _, _, held_out = make_phantoms(3, 16, seed=phantoms.data.seed + 7919, lesion_fraction=0.0, start=3, masks=True)
    assert ruled.shape == (3, 4, 16, 16) and torch.equal(ruled, lesion_rule_masks(phantoms, 3, seed=1, radius=(1.0, 2.0)))
    assert np.array_equal(ruled[:, 0].numpy(), held_out[:, 0])  # in the held-out stream's brains
    assert not ((ruled[:, 1:].amax(1) > 0) & (ruled[:, 0] == 0)).any()
    volumes = tiny_config(extra=["model.cond_channels=4", "model.spatial_dims=3", "data.dataset=brats", "data.path=x"])
    assert masks_to_sample(volumes, 2, seed=0).shape == (2, 4, 16, 16, 16)  # not phantoms: rules, in an ellipsoid
    brain = np.zeros((32, 32, 32), np.uint8)
    brain[4:28, 4:28, 4:28] = 1  # resized to the model's 16
    np.save(tmp_path / "brain.npy", brain)
    given = masks_to_sample(volumes, 2, brain_path=tmp_path / "brain.npy")
    assert torch.equal(given[:, 0], torch.from_numpy(brain[None, ::2, ::2, ::2]).float().expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="--brain-masks"):
        masks_to_sample(volumes, 2, brain_path=tmp_path / "brain.png")
    with pytest.raises(ValueError, match="model.cond_channels is 2"):
        masks_to_sample(tiny_config(extra=["model.cond_channels=2"]), 2, rules=True)
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", "x.pt", "--lesion-radius", "3"])


def test_3d_pairs_are_nifti_with_one_affine(tmp_path):
    images, masks = torch.rand(2, 1, 8, 8, 8) * 2 - 1, (torch.rand(2, 3, 8, 8, 8) > 0.7).float()
    written = write_pairs(images, masks, tmp_path, "s", spacing=(1.5, 1.0, 2.0))
    image, mask = nib.load(written["image_1"]), nib.load(written["mask_1"])
    assert np.array_equal(image.affine, mask.affine) and image.shape == mask.shape == (8, 8, 8)
    assert np.array_equal(np.asarray(mask.dataobj), label_map(masks[1].numpy()))


def test_guidance_on_masks_mixes_the_conditional_and_null_mask_outputs():
    torch.manual_seed(0)
    model = tiny_unet(cond_channels=2).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, cond = torch.randn(2, 1, 16, 16), torch.tensor([10, 60]), torch.randn(2, 2, 16, 16).sign()
    with torch.no_grad():
        c, u = model(x, t, cond=cond), model(x, t)
        guided = classifier_free_output(model, x, t, None, guidance_scale=3.0, null_label=0, cond=cond)
        torch.testing.assert_close(guided, u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(classifier_free_output(model, x, t, None, guidance_scale=1.0, null_label=0, cond=cond), c)
        torch.testing.assert_close(classifier_free_output(model, x, t, None, guidance_scale=0.0, null_label=0, cond=cond), u)


def test_a_class_conditional_mask_model_samples_masks_with_the_null_label():
    """The mask says whether there is a tumour; alternating labels would call half the tumour masks healthy."""
    cfg = tiny_config(extra=["model.cond_channels=4", "model.num_classes=2"])
    torch.manual_seed(0)
    model = build_unet(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    masks = mask_bank(cfg, 4)
    draw = lambda **kw: sample_images(model, cfg, num=4, device=torch.device("cpu"), masks=masks, progress=False, **kw)
    default, null, alternating = draw(), draw(y=torch.full((4,), 2)), draw(y=torch.arange(4) % 2)
    assert torch.equal(default, null) and not torch.allclose(default, alternating)
    plain = sample_images(model, cfg, num=4, device=torch.device("cpu"), progress=False)  # no masks: the classes in turn
    assert torch.equal(plain, sample_images(model, cfg, num=4, device=torch.device("cpu"), progress=False, y=torch.arange(4) % 2))
