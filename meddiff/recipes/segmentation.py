"""``meddiff evaluate --task segmentation``: the segmentation utility of a mask-conditioned model.

Synthetic pairs come from a mask-conditioned checkpoint (one image generated per mask: the
held-out phantom mask bank, or for BraTS-layout data the real training masks) or from an ``.npz``
of ``images [N, 1, *S]`` and ``masks [N, K, *S]`` as ``meddiff sample --masks`` writes. Real pairs
come from the checkpoint's data (phantoms by default): its training images with their masks, and
held-out pairs no generator or segmenter trains on. The scoring is
:func:`meddiff.evaluate.segmentation.segmentation_utility`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from configs import ExperimentConfig, load_config, with_fields
from meddiff.data.adapters import index_dataset
from meddiff.data.masked import MaskedVolumeDataset
from meddiff.data.phantoms import MASK_CHANNELS, PhantomDataset, make_phantoms
from meddiff.device import resolve_device
from meddiff.evaluate.segmentation import (SegmenterSettings, load_segmenter, region_channels, save_segmenter,
                                           segmentation_utility, train_segmenter)
from meddiff.outputs import readable_upscale, save_overlay_png
from meddiff.recipes.masks import HELD_OUT_SEED_OFFSET, TEST_START, held_out_patients, mask_bank
from meddiff.recipes.restore import codec_from_checkpoint, model_from_checkpoint
from meddiff.recipes.sample import sample_images

Pairs = tuple[torch.Tensor, torch.Tensor]


def real_mask_pairs(cfg: ExperimentConfig, *, num_test: int, seed: int = 0) -> tuple[Pairs, Pairs]:
    """``(training pairs, held-out pairs)``, each ``(images [N, 1, *S] in [-1, 1], masks [N, K, *S] float)``.

    Phantoms: the training stream (``data.seed``, ``data.num_samples``) and ``num_test`` phantoms
    of the held-out stream (``data.seed + 7919``) from index :data:`TEST_START` on. BraTS-layout
    folders: a seeded 80/20 split by patient.
    """
    data = cfg.data
    if data.dataset == "phantoms":
        train = PhantomDataset(data.num_samples, data.image_size, seed=data.seed, lesion_fraction=data.lesion_fraction,
                               with_masks=True)
        images, _, masks = make_phantoms(num_test, data.image_size, seed=data.seed + HELD_OUT_SEED_OFFSET,
                                         lesion_fraction=data.lesion_fraction, start=TEST_START, masks=True)
        test = (torch.from_numpy(images)[:, None] * 2.0 - 1.0, torch.from_numpy(masks).float())
        return (train.images, train.masks.float()), test
    if data.dataset == "brats":
        records = index_dataset(data).records
        patients = sorted({r.patient_id for r in records})
        if len(patients) < 2:
            raise ValueError(f"{data.path}: segmentation needs at least 2 patients (training and held-out), found {len(patients)}")
        held_out = held_out_patients(patients, seed)
        split = [MaskedVolumeDataset([r for r in records if (r.patient_id in held_out) == test], data,
                                     spatial_dims=cfg.model.spatial_dims) for test in (False, True)]
        return tuple((d.images, d.masks.float()) for d in split)
    raise ValueError(f"data.dataset={data.dataset!r} gives no masks to score segmentation with; use phantoms or brats")


def load_synthetic_npz(path: str | Path, *, real_masks: torch.Tensor) -> Pairs:
    """Pairs from an ``.npz`` with ``images [N, 1, *S]`` and ``masks [N, K, *S]`` in {0, 1} on the
    real data's grid (``real_masks [M, K, *S]``); errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--synthetic {path}: file not found")
    with np.load(path) as z:
        missing = [k for k in ("images", "masks") if k not in z.files]
        if missing:
            raise ValueError(f"--synthetic {path}: no array named {missing[0]!r} (found {sorted(z.files)})")
        images, masks = z["images"], z["masks"]
    want = (real_masks.shape[1], *real_masks.shape[2:])
    if images.ndim != real_masks.ndim or images.shape[1] != 1 or images.shape[2:] != want[1:]:
        raise ValueError(f"--synthetic {path}: 'images' has shape {images.shape}, expected [N, 1, {', '.join(map(str, want[1:]))}]")
    if masks.shape != (len(images), *want):
        raise ValueError(f"--synthetic {path}: 'masks' has shape {masks.shape}, expected {(len(images), *want)} "
                         f"(one [K, *S] mask per image, K = {want[0]} channels {list(MASK_CHANNELS)})")
    if not np.isin(masks, (0, 1)).all():
        raise ValueError(f"--synthetic {path}: 'masks' must hold only 0 and 1")
    if not np.isfinite(images).all():
        raise ValueError(f"--synthetic {path}: 'images' holds NaN or infinite values")
    return torch.from_numpy(images.astype(np.float32)).clamp(-1.0, 1.0), torch.from_numpy(masks.astype(np.float32))


def generated_pairs(model, cfg: ExperimentConfig, *, real_masks: torch.Tensor, num: int, device, seed: int,
                    progress: bool, batch: int = 64, codec=None) -> Pairs:
    """One generated image per mask: ``num`` masks of the held-out phantom bank, or for other data
    the real training masks (``real_masks``, tumour-bearing ones first: :func:`tumours_first`),
    cycled; generated ``batch`` at a time (a latent model's decoded by its ``codec``)."""
    if cfg.data.dataset == "phantoms":
        masks = mask_bank(cfg, num, seed=seed)
    else:
        ordered = tumours_first(real_masks, seed)
        masks = ordered[torch.arange(num) % len(ordered)]
    images = [sample_images(model, cfg, num=len(chunk), device=device, seed=seed + i, progress=progress,
                            masks=chunk, codec=codec).cpu() for i, chunk in enumerate(masks.split(batch))]
    return torch.cat(images).clamp(-1.0, 1.0), masks


def tumours_first(masks: torch.Tensor, seed: int) -> torch.Tensor:
    """``masks [N, K, *S]`` in a seeded random order with every mask that holds tumour before the
    tumour-free ones (slices above and below a tumour), so a few hundred generated pairs are
    mostly lesion examples, the ones augmentation is for."""
    order = torch.randperm(len(masks), generator=torch.Generator().manual_seed(seed))
    return masks[order[tumour_bearing_first(whole_tumour(masks[order]))]]


def whole_tumour(masks: torch.Tensor) -> torch.Tensor:
    """The whole tumour (union of the tumour sub-regions) of ``masks [N, K, *S]``: ``[N, 1, *S]``."""
    return masks[:, list(region_channels(MASK_CHANNELS)["whole_tumour"])].amax(1, keepdim=True)


def tumour_bearing_first(region: torch.Tensor) -> torch.Tensor:
    """Indices of ``region [N, 1, *S]`` with the non-empty ones first, each group in its order."""
    return torch.argsort((region.flatten(1).sum(1) == 0).to(torch.uint8), stable=True)


def write_pairs_figure(synthetic: Pairs, real: Pairs, path: Path, per_row: int = 8) -> Path:
    """``pairs.png``: up to two rows of generated images, then up to two rows of real held-out ones,
    each with its mask's whole-tumour outline in red (tumour-bearing pairs first; 3-D: the middle
    slice)."""
    def pick(pairs: Pairs) -> Pairs:
        images, masks = pairs
        region = whole_tumour(masks)
        order = tumour_bearing_first(region)[:2 * per_row]
        blank = -len(order) % per_row  # black tiles complete the last row
        pad = lambda x, value: torch.cat([x[order], x.new_full((blank, *x.shape[1:]), value)])  # noqa: E731
        return pad(images, -1.0), pad(region, 0.0)

    (syn_images, syn_region), (real_images, real_region) = pick(synthetic), pick(real)
    return save_overlay_png(torch.cat([syn_images, real_images]), torch.cat([syn_region, real_region]), path,
                            nrow=per_row, upscale=readable_upscale(synthetic[0].shape[-1]))


def real_subset(pairs: Pairs, fraction: float, seed: int) -> Pairs:
    """A seeded ``fraction`` of the pairs (at least one): the scarce-real-data case."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--real-fraction must be in (0, 1], got {fraction}")
    n = max(1, math.ceil(fraction * len(pairs[0])))
    idx = torch.randperm(len(pairs[0]), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return pairs[0][idx], pairs[1][idx]


def _config_and_model(checkpoint, synthetic, data_path, device):
    """The experiment config (the checkpoint's, or the default phantoms at the NPZ's size) and the model."""
    if checkpoint is None:
        if synthetic is None:
            raise ValueError("give --checkpoint (a mask-conditioned model) or --synthetic (an .npz of images and masks)")
        if not Path(synthetic).is_file():
            raise FileNotFoundError(f"--synthetic {synthetic}: file not found")
        with np.load(Path(synthetic)) as z:
            shape = z["masks"].shape if "masks" in z.files else ()
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ValueError(f"--synthetic {synthetic}: without --checkpoint the real data are the default 2-D phantoms, "
                             f"so 'masks' must be [N, 4, S, S] (found {shape or 'no masks'}); pass --checkpoint for other data")
        return load_config(None, [f"data.image_size={shape[2]}"]), None, None
    model, cfg, ckpt = model_from_checkpoint(checkpoint, device=device)
    if not cfg.model.cond_channels:
        raise ValueError(f"{checkpoint}: not a mask-conditioned model (model.cond_channels=0); train one with "
                         "model.cond_channels=4, or pass --synthetic pairs")
    if data_path:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data_path)))
    return cfg, model, codec_from_checkpoint(ckpt, cfg, source=str(checkpoint))


def evaluate_segmentation(*, checkpoint: Optional[str | Path] = None, synthetic: Optional[str | Path] = None,
                          out_dir: Optional[str | Path] = None, data_path: Optional[str] = None, real_fraction: float = 1.0,
                          steps: int = 1000, num_samples: int = 256, num_test: int = 256, segmenter: Optional[str] = None,
                          guidance_scale: Optional[float] = None, ddim_steps: Optional[int] = None,
                          device: str = "auto", seed: int = 0, progress: bool = True) -> dict:
    """Score synthetic pairs by segmentation utility; writes ``segmentation.json``, ``segmentation.md``,
    the real-data segmenter (``segmenter_real.pt``, for mask fidelity) and, when it generates them,
    the pairs (``generated_pairs.npz``, as ``meddiff sample --masks`` writes) to ``out_dir``.

    ``real_fraction`` of the real training pairs trains the real-only and real + synthetic arms;
    mask fidelity uses ``segmenter`` (a file from :func:`save_segmenter`) or one trained on all of
    them. ``guidance_scale`` (mask classifier-free guidance; > 1 follows the mask more closely) and
    ``ddim_steps`` override the checkpoint's sampler when pairs are generated. Returns the report.
    """
    if synthetic is not None and (guidance_scale, ddim_steps) != (None, None):
        raise ValueError("--guidance-scale and --ddim-steps set how pairs are generated from --checkpoint; the --synthetic "
                         "pairs are already generated")
    dev = resolve_device(device)
    cfg, model, codec = _config_and_model(checkpoint, synthetic, data_path, dev)
    cfg = with_fields(cfg, {"sampler.guidance_scale": guidance_scale, "sampler.num_inference_steps": ddim_steps})
    real_train, real_test = real_mask_pairs(cfg, num_test=num_test, seed=seed)
    out = Path(out_dir) if out_dir else (Path(checkpoint).resolve().parent.parent / "eval" if checkpoint
                                         else Path(synthetic).resolve().parent)
    out.mkdir(parents=True, exist_ok=True)
    if synthetic is not None:
        syn = load_synthetic_npz(synthetic, real_masks=real_train[1])
    else:  # kept, so other settings (--real-fraction, --seg-steps) can rescore them with --synthetic
        syn = generated_pairs(model, cfg, real_masks=real_train[1], num=num_samples, device=dev, seed=seed, progress=progress,
                              codec=codec)
        np.savez_compressed(out / "generated_pairs.npz", images=syn[0].numpy(), masks=syn[1].numpy().astype(np.uint8))
    write_pairs_figure(syn, real_test, out / "pairs.png")
    scarce = real_subset(real_train, real_fraction, seed)
    settings = SegmenterSettings(steps=steps, seed=seed)
    reference = None
    if segmenter is not None:
        reference = load_segmenter(segmenter, device=dev)
        if (reference.settings.out_channels, reference.settings.spatial_dims) != (syn[1].shape[1], syn[1].ndim - 2):
            raise ValueError(f"--segmenter {segmenter}: predicts {reference.settings.out_channels} channels in "
                             f"{reference.settings.spatial_dims}-D, the data have {syn[1].shape[1]} in {syn[1].ndim - 2}-D")
    elif real_fraction < 1.0:
        reference = train_segmenter(*real_train, settings=settings, channel_names=MASK_CHANNELS, device=dev)
    report, segmenters = segmentation_utility(scarce, syn, real_test, settings=settings, channel_names=MASK_CHANNELS,
                                              reference=reference, device=dev)
    report["fidelity_segmenter"] = str(segmenter) if segmenter else "real (all training pairs)"
    if segmenter is None:
        report["segmenter_file"] = str(save_segmenter(out / "segmenter_real.pt", reference or segmenters["real_only"]))
    report.update(checkpoint=str(checkpoint) if checkpoint else None, synthetic=str(synthetic) if synthetic else None,
                  sampler=None if synthetic is not None else dataclasses.asdict(cfg.sampler), dataset=cfg.data.dataset,
                  real_fraction=real_fraction, num_real_available=len(real_train[0]))
    (out / "segmentation.json").write_text(json.dumps(report, indent=2))
    (out / "segmentation.md").write_text(segmentation_table(report) + "\n")
    report["out_dir"] = str(out)
    return report


def segmentation_table(report: dict) -> str:
    """The report as a Markdown table: Dice per region (rows) for each arm and mask fidelity."""
    cols = [("real only", report["arms"]["real_only"]), ("synthetic only", report["arms"]["synthetic_only"]),
            ("real + synthetic", report["arms"]["real_plus_synthetic"]), ("mask fidelity", report["mask_fidelity"])]

    def fmt(r: dict) -> str:
        return "—" if r["dice"] is None else f"{r['dice']:.3f}"

    lines = [f"Dice on {report['num_real_test']} real held-out pairs; training: {report['num_real_train']} real "
             f"(fraction {report['real_fraction']:g} of {report['num_real_available']}), {report['num_synthetic']} "
             f"synthetic; segmenter steps {report['settings']['steps']}.", "",
             "| region | " + " | ".join(c for c, _ in cols) + " | test cases |", "| --- " * (len(cols) + 2) + "|"]
    for region, first in cols[0][1].items():
        lines.append(f"| {region} | " + " | ".join(fmt(c[region]) for _, c in cols) + f" | {first['cases']} |")
    lines += ["", "Mask fidelity: the real-data segmenter on the synthetic images against the masks they were "
              "generated from. Dice counts only images whose mask holds the region."]
    return "\n".join(lines)
