"""Segmentation utility of mask-conditioned synthesis: do generated (image, mask) pairs train a
segmenter that works on real images, and does each generated image show what its mask says?

One fixed, small recipe trains every segmenter: MONAI's residual U-Net (Ronneberger et al. 2015,
"U-Net: Convolutional Networks for Biomedical Image Segmentation", with residual units), 2-D or
3-D by the data, one sigmoid output per mask channel (the channels overlap: the brain contains the
tumour), trained with the soft Dice loss (Milletari et al. 2016, "V-Net", Eq. 1; MONAI's
``DiceLoss``) plus per-voxel binary cross-entropy, and scored with MONAI's ``DiceMetric``.

The protocol follows Med-DDPM (Dorjsembe et al. 2024, "Conditional Diffusion Models for Semantic
3D Brain MRI Synthesis"): segmenters trained on real pairs only, on synthetic pairs only and on
real plus synthetic pairs are all tested on the same real held-out pairs. *Mask fidelity* applies
a segmenter trained on real data to the generated images and scores it against the masks they
were generated from: high when each image shows its mask's lesion where the mask puts it.

Images are ``[N, 1, *S]`` in [-1, 1], masks ``[N, K, *S]`` in {0, 1}; ``*S`` is ``(H, W)`` or
``(D, H, W)``. Plain PyTorch and MONAI, deterministic for a seed on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from meddiff.data.phantoms import MASK_CHANNELS
from meddiff.evaluate.encoders import read_model_file

SEGMENTER_FORMAT = "meddiff-segmenter-v1"
#: Channels whose union is the whole tumour, and the BraTS tumour core (necrotic + enhancing).
TUMOUR_CHANNELS, CORE_CHANNELS = ("necrotic", "oedema", "enhancing"), ("necrotic", "enhancing")


@dataclass(frozen=True)
class SegmenterSettings:
    """The recipe: network shape (MONAI ``UNet`` arguments) and the training budget."""

    spatial_dims: int = 2
    out_channels: int = len(MASK_CHANNELS)
    channels: tuple[int, ...] = (16, 32, 64)
    strides: tuple[int, ...] = (2, 2)
    num_res_units: int = 1
    steps: int = 1000
    batch_size: int = 16
    lr: float = 5e-3
    seed: int = 0
    threshold: float = 0.5  # on the sigmoid output

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict) -> "SegmenterSettings":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


@dataclass
class Segmenter:
    """A trained segmenter: ``predict(images [N, 1, *S]) -> masks [N, K, *S]`` in {0, 1}."""

    model: nn.Module
    settings: SegmenterSettings
    channel_names: tuple[str, ...] = MASK_CHANNELS
    info: dict = field(default_factory=dict)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        self.model.eval()
        device = next(self.model.parameters()).device
        out = [torch.sigmoid(self.model(images[i:i + batch_size].to(device).float())).gt(self.settings.threshold).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.settings.out_channels, *images.shape[2:])


def build_segmenter(settings: SegmenterSettings) -> nn.Module:
    """MONAI's ``UNet`` for one image channel in and ``settings.out_channels`` logits out."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=settings.spatial_dims, in_channels=1, out_channels=settings.out_channels,
                channels=settings.channels, strides=settings.strides, num_res_units=settings.num_res_units)


def check_pairs(images: torch.Tensor, masks: torch.Tensor, what: str) -> None:
    """A clear ``ValueError`` unless ``images [N, 1, *S]`` and ``masks [N, K, *S]`` are pairs."""
    if images.ndim not in (4, 5) or images.shape[1] != 1:
        raise ValueError(f"{what} images: shape {tuple(images.shape)}, expected [N, 1, H, W] or [N, 1, D, H, W]")
    if masks.ndim != images.ndim or masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]:
        raise ValueError(f"{what} masks: shape {tuple(masks.shape)} does not pair with images {tuple(images.shape)} "
                         "(expected [N, K, *S] on the images' grid)")
    if len(images) == 0:
        raise ValueError(f"{what}: no (image, mask) pairs")


def train_segmenter(images: torch.Tensor, masks: torch.Tensor, *, settings: Optional[SegmenterSettings] = None,
                    channel_names: Sequence[str] = MASK_CHANNELS, device: str | torch.device = "cpu") -> Segmenter:
    """Train the recipe's segmenter on ``images [N, 1, *S]`` in [-1, 1] and ``masks [N, K, *S]`` in {0, 1}.

    ``settings.steps`` Adam steps on batches drawn with replacement by a seeded generator; the
    loss is soft Dice over the batch (Milletari et al. 2016, Eq. 1) plus binary cross-entropy,
    every channel a foreground region (``include_background=True``: channel 0, the brain, is a
    region, not a background class). ``settings.spatial_dims`` and ``out_channels`` follow the data.
    """
    from monai.losses import DiceLoss

    check_pairs(images, masks, "training")
    base = settings or SegmenterSettings()
    settings = dataclasses.replace(base, spatial_dims=images.ndim - 2, out_channels=masks.shape[1])
    factor = math.prod(settings.strides)
    if any(s % factor for s in images.shape[2:]):
        raise ValueError(f"image size {tuple(images.shape[2:])} is not divisible by {factor} (the U-Net's strides)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = build_segmenter(settings).to(device)
    dice, bce = DiceLoss(sigmoid=True, include_background=True, batch=True), nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    model.train()
    losses = []
    for _ in range(settings.steps):
        idx = torch.randint(len(images), (min(settings.batch_size, len(images)),), generator=gen)
        x, m = images[idx].to(device).float(), masks[idx].to(device).float()
        logits = model(x)
        loss = dice(logits, m) + bce(logits, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tail = losses[-20:] or [float("nan")]
    info = {"train_pairs": len(images), "final_loss": sum(tail) / len(tail)}
    return Segmenter(model.eval(), settings, tuple(channel_names), info)


def region_channels(channel_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The regions scored: each channel by name, the whole tumour (union of the tumour
    sub-regions present) and the tumour core (necrotic + enhancing), as channel indices."""
    names = list(channel_names)
    regions = {name: (i,) for i, name in enumerate(names)}
    for region, parts in (("whole_tumour", TUMOUR_CHANNELS), ("tumour_core", CORE_CHANNELS)):
        idx = tuple(names.index(p) for p in parts if p in names)
        if len(idx) > 1:
            regions[region] = idx
    return regions


def region_dice(pred: torch.Tensor, target: torch.Tensor, channel_names: Sequence[str]) -> dict[str, dict]:
    """Dice per region of binary ``pred`` and ``target`` ``[N, K, *S]``: ``{region: {"dice", "cases"}}``.

    MONAI's ``DiceMetric`` per image, averaged over the images whose *target* holds the region
    (``ignore_empty=True``; ``cases`` counts them, ``dice`` is None without any), with
    ``include_background=True`` because every channel is a region (none is a background class).
    """
    from monai.metrics import DiceMetric

    check_pairs(pred[:, :1], target, "scored")
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True, get_not_nans=True)
    out = {}
    for region, idx in region_channels(channel_names).items():
        p, t = pred[:, list(idx)].amax(1, keepdim=True), target[:, list(idx)].float().amax(1, keepdim=True)
        metric.reset()
        metric(y_pred=p, y=t)
        value, cases = metric.aggregate()
        n = int(cases.item())
        out[region] = {"dice": float(value.item()) if n else None, "cases": n}
    return out


def evaluate_segmenter(segmenter: Segmenter, images: torch.Tensor, masks: torch.Tensor) -> dict[str, dict]:
    """:func:`region_dice` of ``segmenter`` on ``images [N, 1, *S]`` against ``masks [N, K, *S]``."""
    check_pairs(images, masks, "test")
    if masks.shape[1] != segmenter.settings.out_channels:
        raise ValueError(f"the segmenter predicts {segmenter.settings.out_channels} mask channels, the masks have {masks.shape[1]}")
    return region_dice(segmenter.predict(images), masks, segmenter.channel_names)


def segmentation_utility(real_train: tuple[torch.Tensor, torch.Tensor], synthetic: tuple[torch.Tensor, torch.Tensor],
                         real_test: tuple[torch.Tensor, torch.Tensor], *, settings: Optional[SegmenterSettings] = None,
                         channel_names: Sequence[str] = MASK_CHANNELS, reference: Optional[Segmenter] = None,
                         device: str | torch.device = "cpu") -> tuple[dict, dict[str, Segmenter]]:
    """Train on real only, synthetic only and real + synthetic pairs; test each on ``real_test``.

    Each argument is ``(images [N, 1, *S] in [-1, 1], masks [N, K, *S] in {0, 1})``; every arm gets
    the same recipe and budget (Med-DDPM's protocol, Dorjsembe et al. 2024). Mask fidelity scores
    ``reference`` (a segmenter trained on real data; default: the real-only arm's) on the synthetic
    images against the masks they were generated from.

    Returns ``(report, segmenters)``: a JSON-able report ``{"arms": {arm: {region: {"dice", "cases"}}},
    "mask_fidelity": {...}, counts, settings}`` and the trained segmenters by arm.
    """
    check_pairs(*real_train, "real training")
    check_pairs(*synthetic, "synthetic")
    check_pairs(*real_test, "real test")
    if not real_train[1].shape[1:] == synthetic[1].shape[1:] == real_test[1].shape[1:]:
        raise ValueError(f"mask shapes differ: real training {tuple(real_train[1].shape[1:])}, synthetic "
                         f"{tuple(synthetic[1].shape[1:])}, real test {tuple(real_test[1].shape[1:])} ([K, *S] each)")
    data = {"real_only": real_train, "synthetic_only": synthetic,
            "real_plus_synthetic": (torch.cat([real_train[0], synthetic[0]]), torch.cat([real_train[1], synthetic[1]]))}
    segmenters = {arm: train_segmenter(x, m, settings=settings, channel_names=channel_names, device=device)
                  for arm, (x, m) in data.items()}
    judge = reference or segmenters["real_only"]
    report = {
        "arms": {arm: evaluate_segmenter(s, *real_test) for arm, s in segmenters.items()},
        "mask_fidelity": evaluate_segmenter(judge, *synthetic),
        "fidelity_segmenter": "given" if reference is not None else "real_only",
        "num_real_train": len(real_train[0]), "num_synthetic": len(synthetic[0]), "num_real_test": len(real_test[0]),
        "settings": segmenters["real_only"].settings.to_dict(), "channel_names": list(channel_names),
    }
    return report, segmenters


def save_segmenter(path: str | Path, segmenter: Segmenter) -> Path:
    """Write ``{format, settings, channel_names, info, state_dict}`` (plain data and tensors) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": SEGMENTER_FORMAT, "settings": segmenter.settings.to_dict(),
                "channel_names": list(segmenter.channel_names), "info": dict(segmenter.info),
                "state_dict": {k: v.detach().cpu() for k, v in segmenter.model.state_dict().items()}}, path)
    return path


def load_segmenter(path: str | Path, *, device: str | torch.device = "cpu") -> Segmenter:
    """A frozen segmenter from :func:`save_segmenter`'s file (``weights_only=True``: no code is unpickled)."""
    blob = read_model_file(path, SEGMENTER_FORMAT, "segmenter")
    try:
        settings = SegmenterSettings.from_dict(blob["settings"])
        model = build_segmenter(settings)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path}: the segmenter's settings or weights do not fit the recipe: {exc}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return Segmenter(model.to(device).eval(), settings, tuple(blob["channel_names"]), dict(blob.get("info", {})))
