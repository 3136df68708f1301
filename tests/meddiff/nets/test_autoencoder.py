"""The KL autoencoder (latent diffusion's first stage): shapes, learning, checkpoints, DP readiness."""

import pytest
import torch

from meddiff.data import PhantomDataset
from meddiff.latent import LatentCodec, LatentStats, encode_dataset, latent_stats
from meddiff.nets.autoencoder import AutoencoderObjective, KLAutoencoder, kl_per_example
from tests.conftest import tiny_config

LDM = ["autoencoder.enabled=true", "autoencoder.mode=not_private", "autoencoder.channels=[8,16]", "autoencoder.norm_groups=4",
       "autoencoder.latent_channels=2", "model.in_channels=2", "model.out_channels=2", "model.attention_resolutions=[4]",
       "autoencoder.batch_size=16", "autoencoder.lr=3e-3"]


def tiny_ae(spatial_dims=2, **kw):
    args = dict(spatial_dims=spatial_dims, in_channels=1, latent_channels=2, channels=(8, 16), norm_groups=4)
    args.update(kw)
    return KLAutoencoder(**args)


@pytest.mark.parametrize("spatial_dims, size", [(2, 16), (3, 8)])
def test_shapes_in_2d_and_3d_and_empty_batches(spatial_dims, size):
    ae = tiny_ae(spatial_dims)
    x = torch.randn(3, 1, *(size,) * spatial_dims)
    mu, sigma = ae.encode(x)
    assert mu.shape == sigma.shape == ae.latent_shape(x.shape) == (3, 2, *(size // 2,) * spatial_dims)
    assert (sigma > 0).all()
    recon, mu2, _ = ae(x, torch.zeros_like(mu))
    assert recon.shape == x.shape and torch.allclose(mu, mu2)
    assert torch.allclose(recon, ae.decode(mu))  # zero noise: the reconstruction goes through the mean
    empty = torch.zeros(0, 1, *(size,) * spatial_dims)
    losses = AutoencoderObjective().training_losses(ae, empty)
    assert losses.shape == (0,)  # Poisson batches may be empty
    with pytest.raises(ValueError, match="divisible by the autoencoder's downsampling 2"):
        ae.latent_shape((1, 1, *(size + 1,) * spatial_dims))


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    zero = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(kl_per_example(zero, torch.ones_like(zero)), torch.zeros(2))
    assert (kl_per_example(zero + 0.5, torch.ones_like(zero)) > 0).all()
    # closed form for one element: 0.5 (mu^2 + s^2 - log s^2 - 1)
    mu, s = torch.tensor([[0.3]]), torch.tensor([[0.7]])
    assert kl_per_example(mu, s).item() == pytest.approx(0.5 * (0.09 + 0.49 - torch.log(torch.tensor(0.49)).item() - 1))


def test_reconstruction_error_falls_with_training_on_phantoms():
    from meddiff.recipes.first_stage import train_autoencoder

    cfg = tiny_config(extra=LDM)
    data = PhantomDataset(96, 16, seed=0)
    held_out = torch.stack([PhantomDataset(16, 16, seed=5)[i][0] for i in range(16)])
    objective = AutoencoderObjective()
    untrained = tiny_ae()
    torch.manual_seed(cfg.train.seed)
    trained, losses = train_autoencoder(cfg, data, device=torch.device("cpu"), steps=150, progress=False)
    before = objective.reconstruction_error(untrained, held_out).mean().item()
    after = objective.reconstruction_error(trained, held_out).mean().item()
    assert after < 0.5 * before, (before, after)
    assert sum(losses[-10:]) < sum(losses[:10])


def test_codec_checkpoint_round_trip_keeps_weights_and_scale_factor(tmp_path):
    from meddiff.recipes.first_stage import fit_codec, load_codec, save_codec

    cfg = tiny_config(extra=LDM)
    torch.manual_seed(0)
    ae = tiny_ae()
    data = PhantomDataset(32, 16, seed=0)
    codec = fit_codec(cfg, ae, data)
    expected = 1.0 / latent_stats(ae, data).std
    assert codec.scale_factor == pytest.approx(expected)
    path = save_codec(tmp_path / "ae.pt", codec, cfg, step=3)
    loaded = load_codec(path, cfg)
    assert loaded.scale_factor == codec.scale_factor and loaded.digest == codec.digest
    x = torch.stack([data[i][0] for i in range(4)])
    assert torch.equal(loaded.encode(x), codec.encode(x))
    assert torch.allclose(loaded.decode(loaded.encode(x)), codec.decode(codec.encode(x)))
    # a configured scale factor wins over the estimate
    assert fit_codec(tiny_config(extra=LDM + ["autoencoder.scale_factor=0.5"]), ae, data).scale_factor == 0.5
    # a checkpoint whose autoencoder differs from the config's, or was tampered with, is refused
    with pytest.raises(ValueError, match="differs from this config's in \\['latent_channels'\\]"):
        load_codec(path, tiny_config(extra=LDM + ["autoencoder.latent_channels=4", "model.in_channels=4", "model.out_channels=4"]))
    payload = codec.to_payload()
    payload["sha256"] = "0" * 16
    with pytest.raises(ValueError, match="does not match the stored"):
        LatentCodec.from_payload(payload, tiny_ae())


def test_latent_statistics_merge_exactly_and_give_unit_variance_latents():
    torch.manual_seed(0)
    ae = tiny_ae()
    a, b = PhantomDataset(20, 16, seed=1), PhantomDataset(12, 16, seed=2)
    merged = latent_stats(ae, a).merge(latent_stats(ae, b))
    pooled = latent_stats(ae, torch.utils.data.ConcatDataset([a, b]))
    assert merged.count == pooled.count
    assert merged.std == pytest.approx(pooled.std, rel=1e-6)  # exact in float64; the float32 encoder varies by batching
    codec = LatentCodec(ae, merged.scale_factor())
    latents = encode_dataset(codec, torch.utils.data.ConcatDataset([a, b]))
    assert len(latents) == 32 and latents.latents.shape == (32, 2, 8, 8)
    assert latents.latents.std().item() == pytest.approx(1.0, rel=0.02)
    with pytest.raises(ValueError, match="fewer than 2"):
        LatentStats().scale_factor()


def test_optional_perceptual_term_from_a_local_domain_encoder(tmp_path):
    from meddiff.recipes.build import build_autoencoder_objective
    from meddiff.evaluate.encoders import DomainCNN, save_encoder

    torch.manual_seed(0)
    path = save_encoder(tmp_path / "enc.pt", DomainCNN(1, 2, width=8), image_size=16, dataset="phantoms", info={"steps": 0})
    cfg = tiny_config(extra=LDM + ["autoencoder.perceptual_weight=1.0", f"autoencoder.perceptual_weights={path}"])
    with_term = build_autoencoder_objective(cfg)
    plain = build_autoencoder_objective(tiny_config(extra=LDM))
    ae = tiny_ae()
    x = torch.randn(3, 1, 16, 16).clamp(-1, 1)
    a = with_term.training_losses(ae, x, generator=torch.Generator().manual_seed(0))
    b = plain.training_losses(ae, x, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3,) and (a > b).all()
    a.sum().backward()  # gradients reach the autoencoder through the frozen network
    assert all(p.grad is not None for p in ae.parameters())
    vol = with_term.training_losses(tiny_ae(3), torch.randn(2, 1, 8, 16, 16), generator=torch.Generator().manual_seed(0))
    assert vol.shape == (2,)  # 3-D: slice-wise
    rgb = save_encoder(tmp_path / "rgb.pt", DomainCNN(3, 2, width=8), image_size=16, dataset="x", info={})
    with pytest.raises(ValueError, match="reads 3 channel"):
        build_autoencoder_objective(tiny_config(extra=LDM + ["autoencoder.perceptual_weight=1.0", f"autoencoder.perceptual_weights={rgb}"]))


def test_public_pretraining_on_real_chest_xrays_writes_a_reusable_first_stage(tmp_path):
    """autoencoder.mode=public: pre-trained on public data (PneumoniaMNIST here), saved with its
    scale factor and reconstructions; site data is never involved."""
    from meddiff.recipes.first_stage import load_codec, public_codec
    from tests.conftest import shared_file

    npz = shared_file("pneumoniamnist.npz")
    cfg = tiny_config(extra=LDM + ["autoencoder.mode=public", "autoencoder.public_dataset=medmnist",
                                   f"autoencoder.public_path={npz}", "autoencoder.steps=5"])
    codec = public_codec(cfg, device=torch.device("cpu"), run_dir=tmp_path, progress=False)
    assert codec.scale_factor > 0
    assert (tmp_path / "samples" / "autoencoder_reconstructions.png").is_file()
    again = load_codec(tmp_path / "autoencoder.pt", cfg)
    assert again.digest == codec.digest and again.scale_factor == codec.scale_factor


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_latent_unet_denoises_the_autoencoders_latents(spatial_dims):
    from meddiff.recipes.build import build_autoencoder, build_unet, sample_shape

    cfg = tiny_config(extra=LDM + [f"model.spatial_dims={spatial_dims}", "model.num_classes=2"])
    ae, unet = build_autoencoder(cfg), build_unet(cfg)
    x = torch.randn(2, 1, *(16,) * spatial_dims)
    z = ae.encode(x)[0]
    assert z.shape == sample_shape(cfg, 2) == (2, 2, *(8,) * spatial_dims)
    assert unet(z, torch.tensor([5, 500]), torch.tensor([0, 1])).shape == z.shape
    assert ae.decode(z).shape == x.shape
