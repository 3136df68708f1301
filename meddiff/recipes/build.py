"""Config sections to objects: the networks, diffusion, sampler, optimizer, schedules and datasets.

The library below :mod:`meddiff.recipes` takes explicit keyword arguments; the recipes read the
config, and this module is where its sections become objects.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from configs import (DataConfig, DiffusionConfig, ExperimentConfig, ModelConfig, SamplerConfig, TrainConfig)
from meddiff.data import ArrayDataset, PackedMasks, PhantomDataset, read_medmnist_npz
from meddiff.data.adapters import index_dataset
from meddiff.data.cache import MedicalDataset
from meddiff.data.masked import MaskedVolumeDataset
from meddiff.diffusion import AnatomyConstraint, GaussianDiffusion, SpatialConditioning, make_noise_schedule
from meddiff.evaluate.encoders import load_domain_encoder
from meddiff.evaluate.segmentation import load_segmenter
from meddiff.nets import ADMUNet
from meddiff.nets.autoencoder import AutoencoderObjective, KLAutoencoder
from meddiff.nets.trainable import adapter_keys, select_trainable, trainable_summary, update_keys
from meddiff.sampling import SAMPLERS, Sampler

def attention_levels(model_cfg: ModelConfig, image_size: int) -> tuple[int, ...]:
    """Map ``attention_resolutions`` (feature-map sizes) to level indices for ``image_size``."""
    sizes = [image_size // 2**i for i in range(len(model_cfg.channel_mult))]
    return tuple(sizes.index(r) for r in model_cfg.attention_resolutions if r in sizes)


def build_unet_from_section(model_cfg: ModelConfig, image_size: int) -> ADMUNet:
    return ADMUNet(
        spatial_dims=model_cfg.spatial_dims,
        in_channels=model_cfg.in_channels,
        out_channels=model_cfg.out_channels,
        model_channels=model_cfg.model_channels,
        channel_mult=model_cfg.channel_mult,
        num_res_blocks=model_cfg.num_res_blocks,
        attention_levels=attention_levels(model_cfg, image_size),
        num_head_channels=model_cfg.num_head_channels,
        dropout=model_cfg.dropout,
        num_classes=model_cfg.num_classes,
        resblock_updown=model_cfg.resblock_updown,
        norm_groups=model_cfg.norm_groups,
        cond_channels=model_cfg.cond_channels,
    )


def build_unet(cfg: ExperimentConfig) -> ADMUNet:
    """The experiment's UNet, sized for what it denoises (images, or latents for latent diffusion),
    with the parameters ``train.trainable`` does not train frozen (and low-rank adapters added
    for ``lora``, drawn from the global RNG)."""
    model = build_unet_from_section(cfg.model, cfg.unet_input_size)
    return select_trainable(model, cfg.train.trainable, lora_rank=cfg.train.lora_rank)


def trainable_parameters(cfg: ExperimentConfig) -> dict:
    """What the denoiser trains under ``train.trainable``: the mode, adapter rank, parameter
    counts and how many tensors an update carries (for records and reports)."""
    model = build_unet(cfg)
    rank = cfg.train.lora_rank if adapter_keys(model) else None
    return {"mode": cfg.train.trainable, "lora_rank": rank, **trainable_summary(model),
            "update_tensors": len(update_keys(model)), "tensors": len(model.state_dict())}


def build_autoencoder(cfg: ExperimentConfig) -> KLAutoencoder:
    """The first stage of latent diffusion (``autoencoder`` section)."""
    ae = cfg.autoencoder
    return KLAutoencoder(spatial_dims=cfg.model.spatial_dims, in_channels=ae.image_channels, latent_channels=ae.latent_channels,
                         channels=ae.channels, num_res_blocks=ae.num_res_blocks, attention=ae.attention,
                         norm_groups=ae.norm_groups)


def build_autoencoder_objective(cfg: ExperimentConfig) -> AutoencoderObjective:
    """L1 + KL (+ a perceptual term from a frozen domain encoder, when configured)."""
    ae = cfg.autoencoder
    perceptual = None
    if ae.perceptual_weight > 0:
        network, _ = load_domain_encoder(ae.perceptual_weights)
        for p in network.parameters():
            p.requires_grad_(False)
        if network.config["in_channels"] != ae.image_channels:
            raise ValueError(f"{ae.perceptual_weights}: the perceptual network reads {network.config['in_channels']} "
                             f"channel(s) but the images have {ae.image_channels}")
        perceptual = network.features
    return AutoencoderObjective(kl_weight=ae.kl_weight, perceptual=perceptual, perceptual_weight=ae.perceptual_weight)


def build_diffusion(diffusion_cfg: DiffusionConfig) -> GaussianDiffusion:
    betas = make_noise_schedule(
        diffusion_cfg.noise_schedule,
        diffusion_cfg.num_train_timesteps,
        beta_start=diffusion_cfg.beta_start,
        beta_end=diffusion_cfg.beta_end,
    )
    return GaussianDiffusion(betas, prediction_type=diffusion_cfg.prediction_type)


def build_sampler(sampler_cfg: SamplerConfig, diffusion: GaussianDiffusion) -> Sampler:
    kwargs = {"clip_denoised": sampler_cfg.clip_denoised, "timestep_spacing": sampler_cfg.timestep_spacing}
    if sampler_cfg.name == "ddim":
        kwargs["eta"] = sampler_cfg.eta
    return SAMPLERS[sampler_cfg.name](diffusion, **kwargs)


def build_dataset_from_section(data_cfg: DataConfig, *, spatial_dims: int = 2, channels: int = 1,
                               masks: bool = False) -> Dataset:
    """The training images named by ``data.dataset``: ``(x [channels, *S] in [-1, 1], label)`` items;
    with ``masks``, ``(x, label, mask [K, *S])`` triples (phantoms, BraTS-layout folders such as
    ``meddiff data from-template`` cohorts, and folder CSVs with a ``mask`` column)."""
    if data_cfg.dataset == "phantoms":
        if spatial_dims != 2 or channels != 1:
            raise ValueError("data.dataset='phantoms' gives 1-channel 2-D slices: set model.spatial_dims=2 and 1 image channel")
        return PhantomDataset(
            data_cfg.num_samples, data_cfg.image_size, seed=data_cfg.seed, lesion_fraction=data_cfg.lesion_fraction,
            with_masks=masks,
        )
    if masks:
        if data_cfg.dataset not in ("brats", "folder"):
            raise ValueError(f"data.dataset={data_cfg.dataset!r} does not provide masks yet; use phantoms, brats or a "
                             "folder CSV with a 'mask' column")
        return MaskedVolumeDataset(index_dataset(data_cfg).records, data_cfg, spatial_dims=spatial_dims, train=True)
    if data_cfg.dataset == "medmnist":
        if not data_cfg.path:
            raise ValueError("data.path is empty: point it at a MedMNIST .npz file")
        images, labels = read_medmnist_npz(data_cfg.path, data_cfg.split, spatial_dims=spatial_dims)
        return ArrayDataset(images, labels, image_size=data_cfg.image_size, channels=channels)
    if channels != 1:
        raise ValueError(f"data.dataset={data_cfg.dataset!r} gives 1-channel images: use 1 image channel "
                         "(model.in_channels, or autoencoder.image_channels for latent diffusion)")
    index = index_dataset(data_cfg)
    dataset = MedicalDataset(index.records, data_cfg, spatial_dims=spatial_dims, train=True)
    dataset.bad = index.bad + dataset.bad
    if dataset.bad:
        print(f"[meddiff] skipped {len(dataset.bad)} bad item(s) (data.skip_bad=true); first: {dataset.bad[0]}")
    return dataset


def build_image_dataset(cfg: ExperimentConfig, data_cfg: DataConfig | None = None) -> Dataset:
    """:func:`build_dataset_from_section` with the experiment's spatial dims and image channels."""
    return build_dataset_from_section(data_cfg or cfg.data, spatial_dims=cfg.model.spatial_dims, channels=cfg.image_channels)


def build_masked_dataset(cfg: ExperimentConfig, data_cfg: DataConfig | None = None) -> PackedMasks:
    """The images with their masks, packed as ``(cat([image, 2 * mask - 1]) [C + K, *S], label)``
    pairs for the spatially conditioned objective; ``K`` must be ``model.cond_channels``."""
    data = build_dataset_from_section(data_cfg or cfg.data, spatial_dims=cfg.model.spatial_dims,
                                      channels=cfg.image_channels, masks=True)
    return pack_masks(data, cfg)


def pack_masks(data: Dataset, cfg: ExperimentConfig) -> PackedMasks:
    """``(image, label, mask)`` triples as packed ``(x0, label)`` pairs; a clear error unless the
    data's mask channels are the model's ``model.cond_channels``."""
    packed = PackedMasks(data)
    if len(packed.mask_channels) != cfg.model.cond_channels:
        raise ValueError(f"model.cond_channels={cfg.model.cond_channels}, but data.dataset={cfg.data.dataset!r} gives "
                         f"{len(packed.mask_channels)} mask channels {list(packed.mask_channels)}")
    return packed


def build_conditioned_diffusion(cfg: ExperimentConfig, *, cond_dropout: float | None = None,
                                plain: bool = False) -> SpatialConditioning:
    """The denoising loss with the mask concatenated to ``x_t`` (``train.cond_dropout`` unless given),
    weighted inside the tumour by ``train.lesion_weight`` and with the anatomy constraint of
    ``train.anatomy_weight``, unless ``plain`` (the held-out loss, comparable across settings)."""
    t = cfg.train
    p = t.cond_dropout if cond_dropout is None else cond_dropout
    anatomy = build_anatomy_constraint(cfg) if t.anatomy_weight and not plain else None
    return SpatialConditioning(build_diffusion(cfg.diffusion), image_channels=cfg.model.in_channels, cond_dropout=p,
                               lesion_weight=1.0 if plain else t.lesion_weight, lesion_dilation=t.lesion_dilation,
                               anatomy=anatomy)


def build_anatomy_constraint(cfg: ExperimentConfig) -> AnatomyConstraint:
    """The frozen segmenter of ``train.anatomy_segmenter`` as an anatomy constraint; a clear error
    naming the field when it does not fit the model (mask channels, spatial dims)."""
    t = cfg.train
    try:
        segmenter = load_segmenter(t.anatomy_segmenter)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"train.anatomy_segmenter: {exc}") from None
    s = segmenter.settings
    if s.out_channels != cfg.model.cond_channels or s.spatial_dims != cfg.model.spatial_dims:
        raise ValueError(f"train.anatomy_segmenter {t.anatomy_segmenter}: a {s.spatial_dims}-D segmenter of "
                         f"{s.out_channels} mask channels, but the model has model.spatial_dims={cfg.model.spatial_dims} "
                         f"and model.cond_channels={cfg.model.cond_channels}")
    return AnatomyConstraint(segmenter.model, weight=t.anatomy_weight, max_t=t.anatomy_max_t)


def check_labels(dataset: Dataset, model_cfg: ModelConfig) -> None:
    """A conditional model needs labels in ``0..num_classes-1``."""
    labels = getattr(dataset, "labels", None)
    if model_cfg.num_classes and labels is not None and len(labels):
        hi = int(torch.as_tensor(labels).max())
        if hi >= model_cfg.num_classes:
            raise ValueError(f"the data has label {hi} but model.num_classes={model_cfg.num_classes}; raise model.num_classes")


def build_optimizer(train_cfg: TrainConfig, params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def build_lr_schedule(train_cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, *, start_step: int = 0):
    """Linear warm-up, then constant or cosine decay to 10% of ``lr`` over ``total_steps``;
    ``start_step`` continues a schedule (a site's round ``r`` starts at ``(r - 1) x local_steps``
    of the study's ``num_rounds x local_steps``)."""
    warm = train_cfg.warmup_steps

    def factor(step: int) -> float:
        step += start_step
        if warm and step < warm:
            return (step + 1) / warm
        if train_cfg.lr_schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total_steps - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sample_shape(cfg: ExperimentConfig, num: int) -> tuple[int, ...]:
    """Shape of what the UNet generates: images, or latents for latent diffusion."""
    return (num, cfg.model.in_channels) + (cfg.unet_input_size,) * cfg.model.spatial_dims


def sample_spacing(cfg: ExperimentConfig) -> tuple[float, ...]:
    """Voxel spacing (mm) of generated volumes: ``data.target_spacing``, or 1 mm when unset."""
    return tuple(cfg.data.target_spacing) if cfg.data.target_spacing else (1.0,) * 3
