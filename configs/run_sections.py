"""Sections about how a study runs rather than what it trains: the simulation engine, evaluation
during federated runs, public pre-training before a simulated study, and the run directory.
Validation rules as in :mod:`configs.schema`."""

from __future__ import annotations

from dataclasses import dataclass

from configs.fields import _f


@dataclass(frozen=True)
class SimulationConfig:
    """Resources of Flower's local simulation engine (consumed by `meddiff simulate`)."""

    client_cpus: float = _f(1.0, help="CPUs reserved for each simulated site (Ray client resources)", min_exclusive=0.0)
    client_gpus: float = _f(0.0, help="GPU fraction for each simulated site, e.g. 0.25 runs four sites per GPU", min=0.0)
    parallel_sites: int = _f(0, help="sites training at once; 0 = as many as the machine's CPUs allow", min=0)
    ray_address: str = _f("", help="an existing Ray cluster to run the sites on (e.g. 'auto' or 'ray://host:10001'); "
                                   "empty = a local Ray started for the run")


@dataclass(frozen=True)
class EvaluationConfig:
    """Light evaluation during federated training: FID from per-site feature statistics, and in a
    mask-conditioned study each site's segmentation utility on its own data, in a translation study
    each site's SSIM, PSNR and MAE on its own held-out pairs."""

    every: int = _f(0, help="rounds between federated FID evaluations; 0 = off", min=0)
    encoder: str = _f("random_projection", help="feature encoder", choices=("domain", "inception", "pixels", "random_projection"))
    encoder_weights: str = _f("", help="encoder file, readable by the server and every site (domain / inception)")
    num_samples: int = _f(64, help="images generated for each evaluation", min=2)
    max_real: int = _f(512, help="held-out images each site encodes (and, for segmentation, scores segmenters on)", min=2)
    segmentation_steps: int = _f(0, help="mask-conditioned studies: training steps of each segmenter in every site's "
                                         "segmentation utility on its own data after the last round; 0 = off", min=0)
    segmentation_samples: int = _f(64, help="synthetic pairs each site generates for it, from masks of its own "
                                            "training split", min=1)
    segmentation_every: int = _f(0, help="rounds between per-site segmentation evaluations besides the last; "
                                         "0 = after the last round only", min=0)
    translation_examples: int = _f(32, help="translation studies: held-out pairs each site translates every round "
                                            "for its SSIM, PSNR and MAE (one DDIM sample); 0 = off", min=0)


@dataclass(frozen=True)
class OutputConfig:
    """Run directory, checkpoints and sample grids."""

    root: str = _f("runs", help="parent folder of run directories")
    name: str = _f("", help="run directory name; empty = '<timestamp>'")
    checkpoint_every: int = _f(500, help="steps (or rounds) between checkpoints; the last is always saved", min=1)
    sample_every: int = _f(0, help="steps (or rounds) between sample grids; 0 = only at the end", min=0)
    num_samples: int = _f(16, help="images in each sample grid", min=1)
    tensorboard: bool = _f(True, help="write TensorBoard event files (losses, epsilon, FID, sample grids) to <run>/tensorboard")


@dataclass(frozen=True)
class PretrainingConfig:
    """Non-private pre-training on public data before a simulated study (``meddiff simulate``)."""

    steps: int = _f(0, help="centralized non-private steps on public data; the study starts from them (0 = none)", min=0)
    batch_size: int = _f(16, help="examples per pre-training step", min=1)
    lr: float = _f(1e-3, help="AdamW learning rate of the pre-training", min_exclusive=0.0)
