"""The training-phase registry: every layer's answer about a kind of training comes from here."""

import pytest
import torch

from meddiff.nets.autoencoder import KLAutoencoder
from meddiff.nets.unet import ADMUNet
from meddiff.recipes.phases import (AUTOENCODER, DIFFUSION, FINAL_PHASE, MASK_DIFFUSION, PHASES, denoiser_phase,
                                    phase_named, private_plan, study_phases)
from tests.conftest import tiny_config

LDM = ["autoencoder.enabled=true", "autoencoder.mode=not_private", "model.in_channels=3", "model.out_channels=3", "model.attention_resolutions=[4]",
       "autoencoder.num_rounds=2", "autoencoder.local_steps=30", "autoencoder.batch_size=16",
       "federation.num_rounds=3", "federation.local_steps=40", "train.batch_size=32"]


def test_registry_is_in_study_order_and_names_resolve():
    assert list(PHASES) == ["autoencoder", "diffusion", "mask_diffusion", "translation", "translation_regression"]
    assert [p.order for p in PHASES.values()] == sorted(p.order for p in PHASES.values())
    assert phase_named("autoencoder") is AUTOENCODER and phase_named("diffusion") is DIFFUSION
    assert phase_named("") is FINAL_PHASE and phase_named(None) is FINAL_PHASE  # records older than phases
    with pytest.raises(ValueError, match="unknown training phase 'segmentation'.*autoencoder"):
        phase_named("segmentation")


def test_study_phases_follow_the_autoencoder_mode():
    assert study_phases(tiny_config()) == [DIFFUSION]
    assert study_phases(tiny_config(extra=LDM)) == [AUTOENCODER, DIFFUSION]
    public = LDM + ["autoencoder.mode=public", "autoencoder.public_dataset=phantoms", "autoencoder.public_path=x"]
    assert study_phases(tiny_config(extra=public)) == [DIFFUSION]


def test_steps_rounds_batches_and_privacy_per_phase():
    cfg = tiny_config(extra=LDM + ["privacy.enabled=true", "autoencoder.mode=dp"])
    assert (AUTOENCODER.num_rounds(cfg), AUTOENCODER.local_steps(cfg), AUTOENCODER.batch_size(cfg)) == (2, 30, 16)
    assert (DIFFUSION.num_rounds(cfg), DIFFUSION.local_steps(cfg), DIFFUSION.batch_size(cfg)) == (3, 40, 32)
    assert private_plan(cfg) == {"autoencoder": (16, 60), "diffusion": (32, 120)}
    not_private = tiny_config(extra=LDM + ["privacy.enabled=true", "autoencoder.mode=not_private"])
    assert not AUTOENCODER.is_private(not_private) and DIFFUSION.is_private(not_private)
    assert private_plan(not_private) == {"diffusion": (32, 120)}
    assert private_plan(tiny_config()) == {}


def test_each_phase_builds_its_own_model_objective_and_optimizer():
    cfg = tiny_config(extra=LDM)
    assert isinstance(AUTOENCODER.build_model(cfg), KLAutoencoder)
    assert isinstance(DIFFUSION.build_model(cfg), ADMUNet)
    with pytest.raises(ValueError, match="autoencoder.enabled=false"):
        AUTOENCODER.build_model(tiny_config())
    model = AUTOENCODER.build_model(cfg)
    assert AUTOENCODER.build_optimizer(cfg, model.parameters()).param_groups[0]["lr"] == cfg.autoencoder.lr
    assert DIFFUSION.trains_on_latents(cfg) and not AUTOENCODER.trains_on_latents(cfg)
    assert not DIFFUSION.trains_on_latents(tiny_config())
    assert AUTOENCODER.produces_codec and DIFFUSION.draws_samples


def test_held_out_losses_are_per_example():
    cfg = tiny_config(extra=["model.num_classes=2"])
    model = DIFFUSION.build_model(cfg).eval()
    x0, y = torch.randn(5, 1, 16, 16), torch.tensor([0, 1, 0, 1, 1])
    losses = DIFFUSION.held_out_losses(model, DIFFUSION.held_out_objective(cfg), x0, y, torch.Generator().manual_seed(0), cfg)
    assert losses.shape == (5,) and torch.isfinite(losses).all()
    ldm = tiny_config(extra=LDM)
    ae = AUTOENCODER.build_model(ldm).eval()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    recon = AUTOENCODER.held_out_losses(ae, AUTOENCODER.held_out_objective(ldm), images, None, torch.Generator(), ldm)
    assert recon.shape == (3,) and (recon >= 0).all()


def test_records_name_rounds_and_scopes_through_the_phase():
    pixel, ldm = tiny_config(), tiny_config(extra=LDM)
    assert DIFFUSION.scope("site_0") == "site_0" and AUTOENCODER.scope("global") == "autoencoder/global"
    assert DIFFUSION.round_name(pixel) == "round" and AUTOENCODER.round_name(ldm) == "autoencoder round"
    assert DIFFUSION.banner(pixel).endswith(f"local steps at {pixel.federation.num_sites} site(s)")
    assert AUTOENCODER.banner(ldm) == "phase 1: autoencoder, 2 rounds x 30 local steps (NOT private)"
    assert DIFFUSION.banner(ldm).startswith("phase 2: latent diffusion UNet")


def test_the_learning_rate_schedule_runs_across_rounds():
    cfg = tiny_config(extra=["train.lr_schedule=cosine", "federation.num_rounds=4", "federation.local_steps=10"])
    lrs = []
    for rnd in (1, 4):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.train.lr)
        DIFFUSION.lr_schedule(cfg, opt, rnd)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] > lrs[1]  # round 4 starts late in the study's cosine schedule
    assert AUTOENCODER.lr_schedule(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 4) is None


MASKS = ["model.cond_channels=4", "model.num_classes=2", "data.num_samples=12"]


def test_a_mask_conditioned_study_trains_mask_diffusion_on_packed_image_mask_pairs():
    cfg = tiny_config(extra=MASKS)
    assert study_phases(cfg) == [MASK_DIFFUSION] and denoiser_phase(cfg) is MASK_DIFFUSION
    assert denoiser_phase(tiny_config()) is DIFFUSION and DIFFUSION.training_data(tiny_config())[0][0].shape[0] == 1
    assert phase_named("mask_diffusion") is MASK_DIFFUSION and MASK_DIFFUSION.checkpoint_prefix != DIFFUSION.checkpoint_prefix
    data = MASK_DIFFUSION.training_data(cfg)
    x0, y = data[0]
    assert x0.shape == (1 + 4, cfg.data.image_size, cfg.data.image_size)  # image + brain, necrotic, oedema, enhancing
    assert set(torch.unique(x0[1:]).tolist()) <= {-1.0, 1.0} and len(data.labels) == 12
    model = MASK_DIFFUSION.build_model(cfg).eval()
    assert model.cond_channels == 4 and MASK_DIFFUSION.build_objective(cfg).cond_dropout == cfg.train.cond_dropout
    assert MASK_DIFFUSION.held_out_objective(cfg).cond_dropout == 0.0
    weighted = tiny_config(extra=MASKS + ["train.lesion_weight=3", "train.lesion_dilation=1"])
    objective = MASK_DIFFUSION.build_objective(weighted)
    assert (objective.lesion_weight, objective.lesion_dilation) == (3.0, 1)
    assert MASK_DIFFUSION.held_out_objective(weighted).lesion_weight == 1.0  # held-out losses stay comparable
    batch = torch.stack([data[i][0] for i in range(3)])
    losses = MASK_DIFFUSION.held_out_losses(model, MASK_DIFFUSION.held_out_objective(cfg), batch, torch.tensor([0, 1, 0]),
                                            torch.Generator().manual_seed(0), cfg)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    plan = private_plan(tiny_config(extra=MASKS + ["privacy.enabled=true"]))
    assert plan == {"mask_diffusion": (cfg.train.batch_size, MASK_DIFFUSION.planned_steps(cfg))}


def test_mask_conditioning_refuses_what_it_cannot_do():
    from configs.checks import ConfigError

    with pytest.raises(ValueError, match="gives 4 mask channels"):
        MASK_DIFFUSION.training_data(tiny_config(extra=["model.cond_channels=2", "data.num_samples=4"]))
    with pytest.raises(ConfigError, match="data.dataset='medmnist' does not provide"):
        tiny_config(extra=["model.cond_channels=4", "data.dataset=medmnist", "data.path=x.npz"])
    with pytest.raises(ConfigError, match="anatomy_weight.*latent variant"):  # the latent variant has no decoded x0
        tiny_config(extra=LDM + ["model.cond_channels=4", "train.anatomy_weight=1", "train.anatomy_segmenter=seg.pt"])
    with pytest.raises(ConfigError, match="cond_dropout"):
        tiny_config(extra=["train.cond_dropout=1.5"])
