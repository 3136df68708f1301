"""The latent variant of mask-conditioned synthesis: the autoencoder encodes the images alone, the
latent UNet is conditioned on the mask area-pooled to the latent grid (2-D and 3-D), `meddiff train`
then `meddiff sample` give decoded images paired with their full-resolution masks."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from configs.checks import ConfigError
from meddiff.checkpoint import load_checkpoint
from meddiff.cli import main
from meddiff.data import make_phantoms
from meddiff.diffusion import condition_on_grid, mask_to_condition
from meddiff.latent import LatentCodec, encode_dataset, latent_stats
from meddiff.recipes.build import build_autoencoder, build_unet, sample_shape
from meddiff.recipes.centralized import train_centralized
from meddiff.recipes.phases import AUTOENCODER, MASK_DIFFUSION, denoiser_phase, private_plan, study_phases
from tests.conftest import tiny_config

LDM = ["autoencoder.enabled=true", "autoencoder.mode=not_private", "autoencoder.channels=[8,16]", "autoencoder.norm_groups=4",
       "autoencoder.latent_channels=2", "model.in_channels=2", "model.out_channels=2", "model.attention_resolutions=[4]",
       "autoencoder.batch_size=8"]
LATENT_MASKS = LDM + ["model.cond_channels=4", "model.num_classes=2"]


def test_the_latent_variant_is_accepted_and_what_it_cannot_do_is_refused_clearly():
    cfg = tiny_config(extra=LATENT_MASKS + ["train.lesion_weight=3", "train.lesion_dilation=1"])
    assert study_phases(cfg) == [AUTOENCODER, MASK_DIFFUSION] and denoiser_phase(cfg) is MASK_DIFFUSION
    assert MASK_DIFFUSION.trains_on_latents(cfg) and MASK_DIFFUSION.build_objective(cfg).lesion_weight == 3.0
    assert MASK_DIFFUSION.build_model(cfg).conv_in.weight.shape[1] == 2 + 4  # latent channels + mask channels
    plan = private_plan(tiny_config(extra=LATENT_MASKS + ["privacy.enabled=true", "autoencoder.mode=dp"]))
    assert set(plan) == {AUTOENCODER.name, MASK_DIFFUSION.name}
    with pytest.raises(ConfigError, match="'train.anatomy_weight' \\(1.0\\).*latent variant.*train.anatomy_weight=0"):
        tiny_config(extra=LATENT_MASKS + ["train.anatomy_weight=1", "train.anatomy_segmenter=seg.pt"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_latent_unet_is_conditioned_on_the_mask_pooled_to_the_latent_grid(spatial_dims):
    cfg = tiny_config(extra=LATENT_MASKS + [f"model.spatial_dims={spatial_dims}"])
    torch.manual_seed(0)
    codec, unet = LatentCodec(build_autoencoder(cfg), 1.5), build_unet(cfg)
    side = (16,) * spatial_dims
    masks = (torch.rand(3, 4, *side) > 0.7).float()
    x0 = torch.cat([torch.rand(3, 1, *side) * 2 - 1, mask_to_condition(masks)], dim=1)  # packed, as the sites hold it
    z0 = codec.encode_packed(x0)
    grid = sample_shape(cfg, 3)[2:]
    assert grid == (8,) * spatial_dims and z0.shape == (3, 2 + 4, *grid)
    torch.testing.assert_close(z0[:, :2], codec.encode(x0[:, :1]))  # the autoencoder encodes the image alone
    torch.testing.assert_close(z0[:, 2:], condition_on_grid(mask_to_condition(masks), grid))
    losses = MASK_DIFFUSION.build_objective(cfg).training_losses(unet, z0, y=torch.tensor([0, 1, 0]),
                                                                 generator=torch.Generator().manual_seed(1))
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    encoded = encode_dataset(codec, TensorDataset(x0, torch.zeros(3, dtype=torch.long)))
    torch.testing.assert_close(encoded.latents, z0, rtol=1e-5, atol=1e-5)
    packed, plain = latent_stats(codec.autoencoder, TensorDataset(x0, torch.zeros(3))), \
        latent_stats(codec.autoencoder, TensorDataset(x0[:, :1], torch.zeros(3)))
    assert packed == plain  # the scale factor never sees the mask
    images = AUTOENCODER.examples(cfg, TensorDataset(x0, torch.zeros(3, dtype=torch.long)))
    assert images[0][0].shape == (1, *side)


@pytest.mark.slow  # a short centralized run (autoencoder, then UNet), then sampling
def test_a_centralized_latent_mask_study_trains_then_samples_decoded_images_with_full_size_masks(tmp_path):
    cfg = tiny_config(tmp_path, LATENT_MASKS + ["autoencoder.steps=2", "train.steps=2", "data.num_samples=16",
                                                "output.num_samples=2", "sampler.num_inference_steps=2",
                                                "train.lesion_weight=3"])
    run = train_centralized(cfg, progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt.model["conv_in.weight"].shape[1] == 2 + 4 and ckpt.extra["autoencoder"]["scale_factor"] > 0
    ae = load_checkpoint(run / "autoencoder.pt").model
    assert ae["net.encoder.blocks.0.conv.weight"].shape[1] == 1  # it reads the image channel alone
    _, _, given = make_phantoms(3, 32, seed=99, lesion_fraction=1.0, masks=True)  # at 32 px: resized to the images' 16
    np.savez(tmp_path / "given.npz", masks=given)
    assert main(["sample", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--steps", "2", "--no-progress",
                 "--masks", str(tmp_path / "given.npz"), "--out", str(tmp_path / "given")]) == 0
    pairs = np.load(next((tmp_path / "given").glob("*_pairs.npz")))
    assert pairs["images"].shape == (3, 1, 16, 16) and pairs["masks"].shape == (3, 4, 16, 16)  # decoded, full size
    assert np.isfinite(pairs["images"]).all() and set(np.unique(pairs["masks"]).tolist()) == {0, 1}
