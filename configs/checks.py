"""Rules that span several config fields; each error names the fields and the fix."""

from __future__ import annotations

from configs.schema import ExperimentConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


def check_cross_fields(cfg: ExperimentConfig) -> None:
    m, d = cfg.model, cfg.data
    if not m.channel_mult or any(c < 1 for c in m.channel_mult):
        raise ConfigError(f"'model.channel_mult' must be a non-empty list of positive integers, got {list(m.channel_mult)}")
    if m.out_channels != m.in_channels:
        raise ConfigError(
            f"'model.out_channels' ({m.out_channels}) must equal 'model.in_channels' ({m.in_channels}): "
            "the network predicts noise, velocity or x0 of the same shape as the image"
        )
    check_autoencoder(cfg)
    check_conditioning(cfg)
    check_translation(cfg)
    check_fine_tuning(cfg)
    size = cfg.unet_input_size  # data.image_size without latents
    what = (f"the latent side data.image_size / {cfg.latent_downsampling} = {size}" if cfg.autoencoder.enabled
            else f"data.image_size={d.image_size}")
    factor = 2 ** (len(m.channel_mult) - 1)
    if size % factor:
        raise ConfigError(
            f"{what} must be divisible by {factor}, since 'model.channel_mult' has {len(m.channel_mult)} levels"
        )
    sizes = [size // 2**i for i in range(len(m.channel_mult))]
    for r in m.attention_resolutions:
        if r not in sizes:
            raise ConfigError(
                f"'model.attention_resolutions' has {r}, which is no feature-map size of this model; "
                f"with {what} the sizes are {sizes}"
            )
    if cfg.diffusion.noise_schedule == "linear" and cfg.diffusion.beta_start >= cfg.diffusion.beta_end:
        raise ConfigError("'diffusion.beta_start' must be smaller than 'diffusion.beta_end'")
    s = cfg.sampler
    if s.num_inference_steps > cfg.diffusion.num_train_timesteps:
        raise ConfigError(
            f"'sampler.num_inference_steps' ({s.num_inference_steps}) exceeds "
            f"'diffusion.num_train_timesteps' ({cfg.diffusion.num_train_timesteps})"
        )
    if d.target_spacing and (len(d.target_spacing) != 3 or min(d.target_spacing) <= 0):
        raise ConfigError(f"'data.target_spacing' must be empty or three positive numbers (mm), got {list(d.target_spacing)}")
    if len(d.intensity_percentiles) != 2 or d.intensity_percentiles[0] >= d.intensity_percentiles[1]:
        raise ConfigError(f"'data.intensity_percentiles' must be [lower, upper] with lower < upper, got {list(d.intensity_percentiles)}")
    if cfg.train.device not in ("auto", "cpu", "cuda", "mps") and not cfg.train.device.startswith("cuda:"):
        raise ConfigError(f"'train.device' is {cfg.train.device!r}; use auto, cpu, cuda, cuda:N or mps")
    pc, fed = cfg.privacy, cfg.federation
    if pc.unit == "patient" and pc.max_physical_batch_size < pc.records_per_patient:
        raise ConfigError(f"'privacy.max_physical_batch_size' ({pc.max_physical_batch_size}) must be at least "
                          f"'privacy.records_per_patient' ({pc.records_per_patient}): a patient's records stay in one "
                          "physical batch (or set privacy.unit=record)")
    if pc.central_dp != "off" and fed.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"'privacy.central_dp' ({pc.central_dp}) needs federation.strategy fedavg or fedprox: its noise is "
                          f"calibrated to the sensitivity of an average of clipped updates, not of {fed.strategy}")


def check_conditioning(cfg: ExperimentConfig) -> None:
    """Mask-conditioned synthesis (``model.cond_channels > 0``) needs data that carry masks; its
    latent variant (``autoencoder.enabled``) has no anatomy constraint."""
    if not cfg.model.cond_channels:
        if cfg.train.lesion_weight != 1.0:
            raise ConfigError(f"'train.lesion_weight' ({cfg.train.lesion_weight}) weights the loss inside the tumour mask of "
                              "a mask-conditioned model, but 'model.cond_channels' is 0: set model.cond_channels (e.g. 4) "
                              "or train.lesion_weight=1")
        if cfg.train.anatomy_weight:
            raise ConfigError(f"'train.anatomy_weight' ({cfg.train.anatomy_weight}) constrains a mask-conditioned model, but "
                              "'model.cond_channels' is 0: set model.cond_channels (e.g. 4) or train.anatomy_weight=0")
        if cfg.evaluation.segmentation_steps:
            raise ConfigError(f"'evaluation.segmentation_steps' ({cfg.evaluation.segmentation_steps}) scores each site's "
                              "generated (image, mask) pairs by segmentation, but 'model.cond_channels' is 0: this study "
                              "has no masks; set model.cond_channels (e.g. 4) or evaluation.segmentation_steps=0")
        return
    if cfg.train.anatomy_weight and not cfg.train.anatomy_segmenter:
        raise ConfigError("'train.anatomy_weight' > 0 needs 'train.anatomy_segmenter': a segmenter file, e.g. the "
                          "segmenter_real.pt that `meddiff evaluate --task segmentation` writes")
    if cfg.autoencoder.enabled and cfg.train.anatomy_weight:
        raise ConfigError(f"'train.anatomy_weight' ({cfg.train.anatomy_weight}) segments the predicted x0 image, but with "
                          "'autoencoder.enabled' the mask-conditioned UNet (the latent variant) predicts latents, and "
                          "decoding them at every step is not supported: set train.anatomy_weight=0 or "
                          "autoencoder.enabled=false")
    if cfg.data.dataset not in ("phantoms", "brats", "folder"):
        raise ConfigError(f"'model.cond_channels' > 0 trains on (image, mask) pairs, which data.dataset="
                          f"{cfg.data.dataset!r} does not provide yet; use data.dataset=phantoms, brats (BraTS "
                          "folders and `meddiff data from-template` cohorts) or folder (a CSV with a 'mask' column)")


PHANTOM_CONTRASTS = ("t1", "t2", "ct")
BRATS_SEQUENCES = ("t1n", "t1c", "t2w", "t2f")


def check_translation(cfg: ExperimentConfig) -> None:
    """A translation study (``data.source_sequence`` -> ``data.target_sequence``) names two different
    contrasts its data provide, without mask conditioning (latent: single-channel images)."""
    d = cfg.data
    if not (d.source_sequence or d.target_sequence):
        return
    if not (d.source_sequence and d.target_sequence):
        raise ConfigError("a translation study needs both 'data.source_sequence' and 'data.target_sequence' (got "
                          f"{d.source_sequence!r} and {d.target_sequence!r}); leave both empty for synthesis")
    if d.source_sequence == d.target_sequence:
        raise ConfigError(f"'data.source_sequence' and 'data.target_sequence' are both {d.source_sequence!r}: a "
                          "translation maps one contrast to another")
    known = {"phantoms": PHANTOM_CONTRASTS, "brats": BRATS_SEQUENCES, "folder": PHANTOM_CONTRASTS + BRATS_SEQUENCES}
    if d.dataset not in known:
        raise ConfigError(f"a translation study trains on aligned pairs, which data.dataset={d.dataset!r} does not "
                          "provide; use data.dataset=phantoms (t1, t2, ct), brats (t1n, t1c, t2w, t2f) or folder (a CSV of source,target "
                          "pairs, named with any of those contrasts; ct is read in HU)")
    for field, value in (("source_sequence", d.source_sequence), ("target_sequence", d.target_sequence)):
        if value not in known[d.dataset]:
            raise ConfigError(f"'data.{field}' is {value!r}, no contrast of data.dataset={d.dataset!r}; choose one of "
                              f"{list(known[d.dataset])}")
    if cfg.model.cond_channels:
        raise ConfigError(f"'model.cond_channels' ({cfg.model.cond_channels}) conditions on masks, but this is a "
                          "translation study (data.target_sequence set), conditioned on the source image: set "
                          "model.cond_channels=0 (the source's channels are added by the translation phase)")
    if cfg.autoencoder.enabled and cfg.autoencoder.image_channels != 1:
        raise ConfigError(f"'autoencoder.image_channels' is {cfg.autoencoder.image_channels}, but a latent translation "
                          "study encodes its single-channel target and source images with the one autoencoder: set 1")


def check_autoencoder(cfg: ExperimentConfig) -> None:
    ae, m = cfg.autoencoder, cfg.model
    if not ae.enabled:
        return
    if not ae.channels or any(c < 1 for c in ae.channels):
        raise ConfigError(f"'autoencoder.channels' must be a non-empty list of positive integers, got {list(ae.channels)}")
    bad = [c for c in ae.channels if c % ae.norm_groups]
    if bad:
        raise ConfigError(f"'autoencoder.norm_groups' ({ae.norm_groups}) must divide every width in 'autoencoder.channels'; "
                          f"it does not divide {bad}")
    if cfg.data.image_size % cfg.latent_downsampling:
        raise ConfigError(f"'data.image_size' ({cfg.data.image_size}) must be divisible by {cfg.latent_downsampling}, "
                          f"since 'autoencoder.channels' has {len(ae.channels)} levels")
    if m.in_channels != ae.latent_channels:
        raise ConfigError(f"'model.in_channels' ({m.in_channels}) must equal 'autoencoder.latent_channels' "
                          f"({ae.latent_channels}): with latent diffusion the UNet denoises latents")
    if ae.perceptual_weight > 0 and not ae.perceptual_weights:
        raise ConfigError("'autoencoder.perceptual_weight' > 0 needs 'autoencoder.perceptual_weights' (a domain encoder "
                          "file from `meddiff train-encoder`); nothing is ever downloaded")
    if ae.mode == "dp" and not cfg.privacy.enabled:
        raise ConfigError("'autoencoder.mode' is 'dp' but 'privacy.enabled' is false; for a run without DP set "
                          "autoencoder.mode=not_private (or public)")
    if ae.attention and ae.mode == "dp":
        raise ConfigError("'autoencoder.attention' cannot be used with autoencoder.mode=dp: MONAI's attention blocks fail on "
                          "the empty batches of Poisson sampling; set autoencoder.attention=false")
    if ae.mode == "public" and not ae.checkpoint and not (ae.public_path and ae.public_dataset):
        raise ConfigError("'autoencoder.mode' is 'public': set 'autoencoder.checkpoint' (a trained autoencoder), or "
                          "'autoencoder.public_dataset' and 'autoencoder.public_path' (public data to pre-train on)")


def check_fine_tuning(cfg: ExperimentConfig) -> None:
    """Initial weights and the parameters that train agree."""
    if cfg.privacy.central_dp != "off" and cfg.train.trainable != "all":
        raise ConfigError("'privacy.central_dp' clips whole-model updates at the sites (Flower's clipping mods); "
                          f"it needs train.trainable=all, not {cfg.train.trainable!r}")
    if cfg.train.trainable != "all" and not (cfg.train.init_from or cfg.pretraining.steps):
        raise ConfigError(f"'train.trainable' {cfg.train.trainable!r} fine-tunes pre-trained weights; from scratch the frozen, "
                          "zero-initialised output layers keep the model's output at zero. Set train.init_from or "
                          "pretraining.steps, or train.trainable=all")
    if cfg.pretraining.steps and cfg.train.init_from:
        raise ConfigError("'pretraining.steps' and 'train.init_from' both choose the initial weights; "
                          "set pretraining.steps=0 to start from the checkpoint, or train.init_from=\"\" to pre-train")
