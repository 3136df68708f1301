"""Typed experiment configuration: one frozen dataclass per section.

Each field's ``metadata`` may carry validation rules read by :mod:`configs.load`:

- ``choices``: the allowed values;
- ``min`` / ``max``: an inclusive numeric range (``min_exclusive`` for strict lower bounds);
- ``aliases``: deprecated values and their current names, translated at load time with a warning;
- ``help``: one line shown in error messages and docs.

This module imports nothing heavier than the standard library, so that reading a config never
pulls in torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


from configs.fields import _f
from configs.run_sections import EvaluationConfig, OutputConfig, PretrainingConfig, SimulationConfig

__all__ = ["AUTOENCODER_MODES", "DATASETS", "AutoencoderConfig", "DataConfig", "DiffusionConfig", "EvaluationConfig",
           "ExperimentConfig", "FederationConfig", "ModelConfig", "OutputConfig", "PartitionConfig", "PretrainingConfig",
           "PrivacyConfig", "SamplerConfig", "SimulationConfig", "TrainConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """ADM UNet (Dhariwal & Nichol 2021) hyper-parameters."""

    spatial_dims: int = _f(2, help="2 for images, 3 for volumes", choices=(2, 3))
    in_channels: int = _f(1, help="image channels fed to the network", min=1)
    out_channels: int = _f(1, help="channels the network predicts", min=1)
    model_channels: int = _f(64, help="base channel width", min=1)
    channel_mult: tuple[int, ...] = _f((1, 2, 2), help="width multiplier per resolution level")
    num_res_blocks: int = _f(2, help="residual blocks per level", min=1)
    attention_resolutions: tuple[int, ...] = _f(
        (16, 8), help="feature-map sizes (pixels per side) that get self-attention"
    )
    num_head_channels: int = _f(32, help="channels per attention head", min=1)
    dropout: float = _f(0.0, help="dropout inside residual blocks", min=0.0, max=1.0)
    num_classes: int = _f(0, help="class labels for conditioning; 0 = unconditional", min=0)
    resblock_updown: bool = _f(True, help="BigGAN-style residual up/down-sampling")
    norm_groups: int = _f(32, help="GroupNorm groups (reduced to a divisor of each width)", min=1)
    cond_channels: int = _f(0, help="mask channels concatenated to x_t (mask-conditioned synthesis, the mask_diffusion "
                            "phase; phantoms and brats: 4 = brain, necrotic, oedema, enhancing; with autoencoder.enabled the mask "
                            "is area-pooled to the latent grid); 0 = no spatial conditioning",
                            min=0, max=64)


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward process and training objective (Ho et al. 2020; Nichol & Dhariwal 2021)."""

    num_train_timesteps: int = _f(1000, help="T, the number of forward steps", min=2)
    noise_schedule: str = _f("cosine", help="beta schedule", choices=("linear", "cosine"))
    beta_start: float = _f(1e-4, help="first beta of the linear schedule", min_exclusive=0.0, max=1.0)
    beta_end: float = _f(0.02, help="last beta of the linear schedule", min_exclusive=0.0, max=1.0)
    prediction_type: str = _f("eps", help="what the network predicts", choices=("eps", "v", "x0"))
    noise_multiplicity: int = _f(
        1, help="K (t, noise) draws per example, averaged (Dockhorn et al. 2022)", min=1
    )


@dataclass(frozen=True)
class SamplerConfig:
    """Reverse-process sampler used for sample grids and `meddiff sample`."""

    name: str = _f("ddim", help="sampling algorithm", choices=("ddpm", "ddim"))
    num_inference_steps: int = _f(50, help="denoising steps", min=1)
    eta: float = _f(0.0, help="DDIM stochasticity (0 = deterministic, 1 = DDPM-like)", min=0.0)
    timestep_spacing: str = _f(
        "leading", help="how inference steps are spread over T", choices=("leading", "trailing", "linspace")
    )
    clip_denoised: bool = _f(True, help="clip the predicted x0 to [-1, 1]")
    guidance_scale: float = _f(1.0, help="classifier-free guidance scale (0 = unconditional)", min=0.0)


@dataclass(frozen=True)
class TrainConfig:
    """Local (site or centralized) optimisation."""

    seed: int = _f(0, help="global seed", min=0)
    device: str = _f("auto", help="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    mixed_precision: str = _f(
        "auto", help="'auto' = bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "no", "bf16", "fp16")
    )
    steps: int = _f(1500, help="optimizer steps (centralized); local steps per round come from federation", min=1)
    batch_size: int = _f(32, help="examples per optimizer step", min=1)
    lr: float = _f(2e-4, help="AdamW learning rate", min_exclusive=0.0)
    weight_decay: float = _f(0.0, help="AdamW weight decay", min=0.0)
    lr_schedule: str = _f("constant", help="learning-rate schedule", choices=("constant", "cosine"))
    warmup_steps: int = _f(0, help="linear learning-rate warm-up steps", min=0)
    grad_clip: float = _f(1.0, help="global gradient-norm clip without DP; 0 disables", min=0.0)
    ema_decay: float = _f(0.999, help="EMA decay of the weights", min=0.0, max=1.0)
    label_dropout: float = _f(0.1, help="probability of the null label (classifier-free guidance)", min=0.0, max=1.0)
    cond_dropout: float = _f(0.1, help="probability of the null (all-zero) mask condition (classifier-free guidance; "
                             "model.cond_channels > 0)", min=0.0, max=1.0)
    lesion_weight: float = _f(1.0, help="weight of the squared error inside the (dilated) tumour mask of the condition, 1 "
                              "outside (lesion-focused loss, model.cond_channels > 0); 1 = the plain loss", min_exclusive=0.0,
                              max=100.0)
    lesion_dilation: int = _f(0, help="pixels (voxels; latent cells with autoencoder.enabled) by which the tumour mask grows "
                              "before train.lesion_weight applies",
                              min=0, max=32)
    anatomy_weight: float = _f(0.0, help="weight of the anatomy constraint: a frozen segmenter's soft Dice on the predicted "
                               "x0 against the conditioning mask (model.cond_channels > 0); 0 = off", min=0.0, max=100.0)
    anatomy_segmenter: str = _f("", help="the frozen segmenter of the anatomy constraint: a file of `meddiff evaluate --task "
                                "segmentation` (segmenter_real.pt), one output per mask channel; never downloaded")
    anatomy_max_t: int = _f(200, help="the anatomy constraint applies to timesteps t < anatomy_max_t (low noise, where "
                            "the predicted x0 is an image)", min=1)
    translation_objective: str = _f("diffusion", help="translation study (data.target_sequence set): 'diffusion' (the "
                                    "conditional denoiser, phase translation) or 'regression' (the L1 baseline, phase "
                                    "translation_regression)", choices=("diffusion", "regression"))
    num_workers: int = _f(0, help="DataLoader worker processes", min=0)
    log_every: int = _f(50, help="steps between metric rows", min=1)
    threads: int = _f(0, help="torch CPU threads; 0 keeps torch's default", min=0)
    init_from: str = _f("", help="a project checkpoint whose weights start the run (the denoiser, and for latent "
                        "diffusion the autoencoder): pre-training on public data, then fine-tuning at the sites")
    trainable: str = _f("all", help="denoiser parameters that train (the rest are frozen and never travel)",
                        choices=("all", "attention", "attention_norm", "lora"))
    lora_rank: int = _f(4, help="rank r of the low-rank adapters (train.trainable=lora)", min=1)


#: Translation contrasts: the phantoms' (t1, t2, ct) and the BraTS sequences; "" = not a translation study.
TRANSLATION_CONTRASTS = ("", "t1", "t2", "ct", "t1n", "t1c", "t2w", "t2f")
DATASETS = ("phantoms", "medmnist", "brats", "ixi", "chexpert", "covid_ct", "lidc", "folder")


@dataclass(frozen=True)
class DataConfig:
    """Where training images come from and how they are preprocessed."""

    dataset: str = _f("phantoms", help="data source / folder layout", choices=DATASETS)
    path: str = _f("", help="dataset file or folder (unused for phantoms)")
    labels_csv: str = _f("", help="CSV of path,label[,patient_id][,site][,mask] (dataset 'folder'; "
                     "optional elsewhere); mask: the image's label map, for model.cond_channels > 0")
    split: str = _f("train", help="MedMNIST split to train on", choices=("train", "val", "test"))
    image_size: int = _f(32, help="side length the model sees (pixels)", min=4)
    num_samples: int = _f(2048, help="phantom slices to generate", min=1)
    lesion_fraction: float = _f(0.5, help="fraction of phantoms with a tumour (label 1)", min=0.0, max=1.0)
    seed: int = _f(0, help="seed of the phantom generator", min=0)
    modality: str = _f("auto", help="intensity handling: auto (by dataset), mri or ct", choices=("auto", "mri", "ct"))
    sequence: str = _f("", help="BraTS t1n|t1c|t2w|t2f, IXI T1|T2|PD; empty = t1c / T1")
    source_sequence: str = _f("", help="translation study: the contrast the model reads (phantoms t1|t2|ct; brats "
                              "t1n|t1c|t2w|t2f); empty = no translation", choices=TRANSLATION_CONTRASTS)
    target_sequence: str = _f("", help="translation study: the contrast the model writes (phantoms t2|ct; brats "
                              "t1n|t1c|t2w|t2f), on the source's grid", choices=TRANSLATION_CONTRASTS)
    target_spacing: tuple[float, ...] = _f((), help="resample volumes to this spacing in mm (x, y, z); empty = native")
    hu_window: str = _f("brain", help="CT window preset", choices=("brain", "subdural", "lung", "abdomen", "bone"))
    intensity_percentiles: tuple[float, ...] = _f((0.5, 99.5), help="MRI percentiles mapped to [-1, 1]", min=0.0, max=100.0)
    min_foreground: float = _f(0.1, help="skip slices whose foreground fraction is below this", min=0.0, max=1.0)
    slice_axis: int = _f(2, help="axis of 2-D slices in RAS volumes (2 = axial)", choices=(0, 1, 2))
    finding: str = _f("Pneumonia", help="CheXpert finding column used as the label")
    uncertain_policy: str = _f("zeros", help="CheXpert uncertain (-1) labels", choices=("zeros", "ones", "ignore"))
    skip_bad: bool = _f(False, help="log and skip unreadable items instead of stopping")
    cache_dir: str = _f(".cache/meddiff", help="preprocessed-array cache (memory-mapped)")
    augment: bool = _f(False, help="random flips and small affine transforms while training")


@dataclass(frozen=True)
class PartitionConfig:
    """How the simulation harness splits one dataset into pseudo-sites (see sim/partition.py)."""

    scheme: str = _f("iid", help="site assignment", choices=("iid", "dirichlet", "quantity", "natural"))
    dirichlet_alpha: float = _f(0.5, help="label-skew concentration (smaller = more skew)", min_exclusive=0.0)
    quantity_power: float = _f(1.5, help="power-law exponent of site sizes (quantity skew)", min_exclusive=0.0)
    natural_key: str = _f("site", help="metadata field naming the real site (e.g. IXI hospital)")
    scanner_shift: bool = _f(True, help="give every pseudo-site its own acquisition effects")
    test_fraction: float = _f(0.1, help="patients held out globally, before site assignment", min=0.0, max=0.9)
    site_test_fraction: float = _f(0.1, help="patients held out per site", min=0.0, max=0.9)
    public_fraction: float = _f(0.0, help="patients carved out as a public split before the sites are assigned (an open "
                                "dataset to pre-train on: `meddiff train --public-split manifest.json`)", min=0.0, max=0.9)
    seed: int = _f(0, help="partition seed", min=0)


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD at each site, per patient or per record (consumed by the `privacy` package)."""

    enabled: bool = _f(False, help="train with Opacus DP-SGD")
    unit: str = _f("auto", help="what each site's guarantee protects: patient (all records of one patient; user-level "
                               "DP-SGD), record (one image or slice), or auto (patient when some patient of the site has "
                               "several records, else record)", choices=("auto", "patient", "record"))
    records_per_patient: int = _f(4, help="k: records of a sampled patient used per step, drawn at random (patient unit)",
                                  min=1)
    target_epsilon: float = _f(10.0, help="per-site epsilon budget", min_exclusive=0.0)
    target_delta: Optional[float] = _f(None, help="delta; null = 1/(10*N_site), N = patients or records (the unit)",
                                       min_exclusive=0.0, max=1.0)
    max_grad_norm: float = _f(1.0, help="per-unit clipping norm C (one gradient per patient or per record)", min_exclusive=0.0)
    grad_sample_mode: str = _f("bk", help="per-sample gradients: bk (book-keeping: batched backward, per-layer "
                                          "per-example weight gradients), hooks (Opacus) or vmap (torch.func.vmap "
                                          "over the whole model)",
                               choices=("bk", "hooks", "vmap"), aliases={"no_op": "vmap"})
    max_physical_batch_size: int = _f(64, help="largest batch held in memory at once", min=1)
    central_dp: str = _f("off", help="central user-level DP: Flower's client-side fixed or adaptive clipping plus server noise",
                         choices=("off", "fixed", "adaptive"))
    central_noise_multiplier: float = _f(1.0, help="central DP noise multiplier (std = multiplier x clipping norm / sites)", min=0.0)
    central_clipping_norm: float = _f(1.0, help="central DP update clipping norm (initial norm when adaptive)", min_exclusive=0.0)


@dataclass(frozen=True)
class FederationConfig:
    """Flower rounds and aggregation (consumed by `server` and `sim`)."""

    num_rounds: int = _f(5, help="federated rounds", min=1)
    num_sites: int = _f(3, help="simulated sites", min=1)
    local_steps: int = _f(50, help="optimizer steps per site per round", min=1)
    strategy: str = _f(
        "fedavg",
        help="aggregation strategy",
        choices=("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum"),
    )
    fraction_train: float = _f(1.0, help="fraction of sites sampled each round", min=0.0, max=1.0)
    min_train_nodes: int = _f(2, help="fewest sites a round needs", min=1)
    proximal_mu: float = _f(0.0, help="FedProx proximal term", min=0.0)
    server_lr: float = _f(1e-2, help="server learning rate (FedAdam/FedYogi)", min_exclusive=0.0)
    round_timeout: float = _f(600.0, help="seconds to wait for replies in a round", min_exclusive=0.0)
    transport_dtype: str = _f("fp32", help="dtype of weights on the wire", choices=("fp32", "fp16"))
    server_ema_decay: float = _f(0.9, help="EMA decay of the global weights across rounds", min=0.0, max=1.0)
    max_update_norm_ratio: float = _f(10.0, help="reject updates farther than this x the round median; 0 = off", min=0.0)
    max_failed_rounds: int = _f(2, help="consecutive rounds without min_train_nodes valid updates before the run stops "
                                        "as failed", min=1)


AUTOENCODER_MODES = ("dp", "not_private", "public")


@dataclass(frozen=True)
class AutoencoderConfig:
    """Latent diffusion (Rombach et al. 2022): a KL autoencoder, trained first, then frozen.

    With ``enabled`` the ADM UNet (``model``) runs on the autoencoder's scaled latents: set
    ``model.in_channels`` and ``model.out_channels`` to ``latent_channels``. Federated runs train
    in two phases: phase 1 the autoencoder, phase 2 the latent UNet.
    """

    enabled: bool = _f(False, help="latent diffusion: train the UNet on autoencoder latents")
    mode: str = _f("dp", help="phase 1: dp (federated, DP-SGD at every site), not_private (federated, no DP; "
                               "the report says so), public (pre-trained on public data or loaded from a checkpoint)",
                   choices=AUTOENCODER_MODES)
    image_channels: int = _f(1, help="channels of the images the autoencoder reads and writes", min=1)
    latent_channels: int = _f(3, help="channels of the latent", min=1)
    channels: tuple[int, ...] = _f((32, 64, 64), help="width per level; the latent is 2**(levels-1) times smaller per side")
    num_res_blocks: int = _f(1, help="residual blocks per level", min=1)
    attention: bool = _f(False, help="self-attention in the encoder's and decoder's middle blocks")
    norm_groups: int = _f(16, help="GroupNorm groups (must divide every width)", min=1)
    kl_weight: float = _f(1e-6, help="weight of the KL term against the L1 reconstruction", min=0.0)
    perceptual_weight: float = _f(0.0, help="weight of a perceptual term (0 = off); needs perceptual_weights", min=0.0)
    perceptual_weights: str = _f("", help="frozen feature network for the perceptual term: a domain encoder file "
                                          "from `meddiff train-encoder` (2-D; 3-D volumes use it slice-wise)")
    lr: float = _f(1e-4, help="AdamW learning rate of the autoencoder", min_exclusive=0.0)
    batch_size: int = _f(16, help="images per autoencoder optimizer step", min=1)
    steps: int = _f(500, help="autoencoder steps of centralized training or public pre-training", min=1)
    num_rounds: int = _f(3, help="federated phase-1 rounds", min=1)
    local_steps: int = _f(50, help="autoencoder steps per site per phase-1 round", min=1)
    public_dataset: str = _f("", help="mode public: dataset layout of the public pre-training data", choices=("",) + DATASETS)
    public_path: str = _f("", help="mode public: file or folder of the public pre-training data")
    checkpoint: str = _f("", help="mode public: a trained autoencoder checkpoint to load instead of pre-training")
    scale_factor: float = _f(0.0, help="latent scale (0 = 1 / std of the training latents, estimated from the data)",
                             min=0.0)


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment, as read once from YAML."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    pretraining: PretrainingConfig = field(default_factory=PretrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def latent_downsampling(self) -> int:
        """How many times smaller per side the UNet's input is than the image (1 without latents)."""
        return 2 ** (len(self.autoencoder.channels) - 1) if self.autoencoder.enabled else 1

    @property
    def image_channels(self) -> int:
        """Channels of the training images (the autoencoder's, or the UNet's without latents)."""
        return self.autoencoder.image_channels if self.autoencoder.enabled else self.model.in_channels

    @property
    def unet_input_size(self) -> int:
        """Side length of what the UNet sees: the image, or the latent for latent diffusion."""
        return self.data.image_size // self.latent_downsampling
