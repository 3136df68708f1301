"""``meddiff translate`` and ``meddiff evaluate --task translation``.

The held-out pairs no model trained on: for phantoms, the held-out stream (``data.seed`` + the
segmentation evaluation's offset, from index :data:`TEST_START`) under the default scanner; for
BraTS-layout folders, a seeded 20% of the patients. Scores are in the target's unit (HU for CT,
[0, 1] for MR), over the whole image and inside the body mask of the target.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from configs import ExperimentConfig, with_fields
from meddiff.data.adapters import index_dataset
from meddiff.data.paired import CT_MODEL_RANGE_HU
from meddiff.data.phantom_anatomy import HU_CONTRASTS
from meddiff.device import resolve_device
from meddiff.evaluate.translation import body_mask, translation_metrics
from meddiff.recipes.masks import HELD_OUT_SEED_OFFSET, TEST_START, held_out_patients
from meddiff.recipes.phases import denoiser_phase
from meddiff.recipes.restore import codec_from_checkpoint, model_from_checkpoint
from meddiff.recipes.translation_data import paired_records_data, phantom_pairs_data
from meddiff.recipes.translation_infer import to_target_unit, translate_nifti


def load_translator(checkpoint, device, ddim_steps: Optional[int] = None):
    """``(model, cfg, phase, translate)`` of a translation checkpoint, ``translate(source, samples=,
    seed=)`` running it (with its autoencoder for latent diffusion); ``ddim_steps``: its sampler's
    steps instead of ``sampler.num_inference_steps``. A clear error for any other model."""
    model, cfg, ckpt = model_from_checkpoint(checkpoint, device=device)
    cfg = with_fields(cfg, {"sampler.num_inference_steps": ddim_steps})
    phase = denoiser_phase(cfg)
    if not phase.packs_source:
        raise ValueError(f"{checkpoint}: a {phase.name} model, not a translation model (train one with "
                         "data.source_sequence and data.target_sequence set)")
    codec = codec_from_checkpoint(ckpt, cfg, source=str(checkpoint))

    def translate(source: torch.Tensor, *, samples: int = 1, seed: int = 0) -> torch.Tensor:
        return phase.translate(model, cfg, source.to(device), samples=samples, seed=seed, device=device, codec=codec).cpu()
    return model, cfg, phase, translate


def run_translate(checkpoint, source: Path, out_dir: Path, *, samples: int = 1, device: str = "auto",
                  seed: int = 0, progress: bool = True, ddim_steps: Optional[int] = None) -> list[tuple[str, float]]:
    """Translate a NIfTI file, every NIfTI of a folder, or an ``.npz`` of 2-D sources (array
    ``source`` ``[N, 1, H, W]`` in [-1, 1], the model's side) into ``out_dir``; ``[(output, seconds)]``."""
    from tqdm import tqdm

    dev = resolve_device(device)
    _, cfg, _, translate = load_translator(checkpoint, dev, ddim_steps)
    fn = lambda x: translate(x, samples=samples, seed=seed)  # noqa: E731
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.suffix == ".npz":
        with np.load(source) as f:
            if "source" not in f:
                raise ValueError(f"{source}: no array 'source' ([N, 1, H, W] in [-1, 1]); it holds {sorted(f.files)}")
            x = torch.from_numpy(np.asarray(f["source"], np.float32))
        t0 = time.perf_counter()
        pred = to_target_unit(fn(x), cfg.data.target_sequence).numpy()
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out_dir / "translated.npz", translation=pred)
        return [(str(out_dir / "translated.npz"), time.perf_counter() - t0)]
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise ValueError(f"{source}: no NIfTI files (.nii, .nii.gz) to translate")
    done = []
    for f in tqdm(files, desc="volumes", disable=not progress):
        out = out_dir / f.name.replace(".nii", f"_{cfg.data.target_sequence}.nii", 1)
        done.append((str(out), translate_nifti(fn, f, out, cfg)))
        print(f"[meddiff] {f.name} -> {out} in {done[-1][1]:.1f}s")
    return done


def held_out_pairs(cfg: ExperimentConfig, *, num: int, seed: int = 0,
                   data_path: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source, target)`` ``[N, 1, *S]`` in [-1, 1]: phantoms of the held-out stream; for a
    BraTS-layout study every patient of ``data_path`` (a cohort the federation never saw), else a
    seeded :data:`~meddiff.recipes.masks.BRATS_TEST_FRACTION` of the study's own patients."""
    d = cfg.data
    if data_path and d.dataset != "brats":
        raise ValueError(f"a cohort to score on (--data {data_path}) is read for BraTS-layout studies; this one has "
                         f"data.dataset={d.dataset!r} (phantoms: the held-out stream; folder: 20% of the CSV's patients)")
    if d.dataset == "phantoms":
        data = phantom_pairs_data(cfg, range(TEST_START, TEST_START + num), seed=d.seed + HELD_OUT_SEED_OFFSET,
                                  lesion_fraction=d.lesion_fraction)
    else:
        if data_path:
            d = replace(d, path=str(data_path))
        records = index_dataset(d).records
        patients = sorted({r.patient_id for r in records})
        held = set(patients) if data_path else held_out_patients(patients, seed)
        data = paired_records_data([r for r in records if r.patient_id in held], d, cfg, train=False)
        if len(data) > num:  # evenly over the patients' slices, not the first patient's
            keep = torch.from_numpy(np.linspace(0, len(data) - 1, num).round().astype(np.int64))
            return data.source[keep], data.target[keep]
    return data.source[:num], data.target[:num]


@torch.no_grad()
def site_translation_scores(phase, model, cfg: ExperimentConfig, packed: torch.Tensor, *, seed: int = 0,
                            device="cpu") -> dict[str, float]:
    """A site's SSIM, PSNR and MAE (whole image, the target's unit) of ``phase``'s translations
    of its held-out pairs ``packed [N, C_t + C_s, *S]`` (``cat([target, source])`` in [-1, 1];
    one DDIM sample for a diffusion model)."""
    c = cfg.model.in_channels
    pred = phase.translate(model, cfg, packed[:, c:].to(device), samples=1, seed=seed, device=device).cpu()
    scores = _scores(pred, packed[:, :c].cpu(), cfg.data.target_sequence)
    return {"ssim": scores["ssim"], "psnr": scores["psnr"], "mae": scores["mae"]}


def _scores(pred: torch.Tensor, target: torch.Tensor, contrast: str) -> dict:
    """Whole-image and body-masked scores in the target's unit, averaged over the images."""
    ct = contrast in HU_CONTRASTS
    p, t = to_target_unit(pred.double(), contrast), to_target_unit(target.double(), contrast)
    data_range = CT_MODEL_RANGE_HU[1] - CT_MODEL_RANGE_HU[0] if ct else 1.0
    mask = body_mask(t, threshold=-500.0 if ct else 0.05)
    scores = translation_metrics(p, t, data_range=data_range, mask=mask)
    return {**scores.means(), "skipped": scores.skipped, "unit": "HU" if ct else "[0, 1]"}


def evaluate_translation(*, checkpoint, baseline=None, out_dir=None, num_test: int = 64, samples: int = 4,
                         device: str = "auto", seed: int = 0, ddim_steps: Optional[int] = None,
                         data_path: Optional[str] = None) -> dict:
    """Score a translation checkpoint (and ``baseline``) on held-out pairs; writes ``translation.json``,
    ``translation.md`` and ``translation.png`` (source / target / prediction / |error| rows) in
    ``out_dir`` (default: beside the checkpoint). A stochastic (diffusion) model is scored on one
    sample and on the mean of ``samples`` (``ddim_steps`` DDIM steps, default: its sampler's).
    ``data_path``: a BraTS-layout cohort of other patients to test on (see :func:`held_out_pairs`)."""
    dev = resolve_device(device)
    _, cfg, phase, translate = load_translator(checkpoint, dev, ddim_steps)
    source, target = held_out_pairs(cfg, num=num_test, seed=seed, data_path=data_path)
    out = Path(out_dir) if out_dir else Path(checkpoint).resolve().parent.parent / "translation"
    report = {"checkpoint": str(checkpoint), "source": cfg.data.source_sequence, "target": cfg.data.target_sequence,
              "num_test": len(source), "image_size": cfg.data.image_size,
              "ddim_steps": cfg.sampler.num_inference_steps, "models": {}}
    preds = {}
    runs = [(phase.name, translate, cfg, phase, k) for k in ((1, samples) if phase.stochastic else (1,))]
    if baseline:
        _, b_cfg, b_phase, b_translate = load_translator(baseline, dev)
        runs.append((b_phase.name, b_translate, b_cfg, b_phase, 1))
    for name, fn, c, ph, k in runs:
        t0 = time.perf_counter()
        pred = fn(source, samples=k, seed=seed)
        label = f"{name} (mean of {k})" if ph.stochastic and k > 1 else (f"{name} (1 sample)" if ph.stochastic else name)
        report["models"][label] = {**_scores(pred, target, c.data.target_sequence),
                                   "seconds_per_image": (time.perf_counter() - t0) / max(1, len(source))}
        preds[label] = pred
    out.mkdir(parents=True, exist_ok=True)
    (out / "translation.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "translation.md").write_text(translation_table(report))
    _grid(source, target, preds, cfg.data.target_sequence, out / "translation.png")
    report["out_dir"] = str(out)
    return report


def translation_table(report: dict) -> str:
    """The report as a Markdown table."""
    unit = next(iter(report["models"].values()))["unit"] if report["models"] else ""
    lines = [f"{report['source']} -> {report['target']} on {report['num_test']} held-out pairs "
             f"({report['image_size']} px; MAE in {unit}; masked = inside the target's body mask)", "",
             "| model | SSIM | PSNR (dB) | MS-SSIM | MAE | SSIM masked | PSNR masked | MAE masked | s / image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["models"].items():
        cell = lambda k: f"{r[k]:.4f}" if k in r else "n/a"  # noqa: E731
        lines.append(f"| {name} | {cell('ssim')} | {cell('psnr')} | {cell('ms_ssim')} | {cell('mae')} | "
                     f"{cell('ssim_masked')} | {cell('psnr_masked')} | {cell('mae_masked')} | {r['seconds_per_image']:.3f} |")
    skipped = {k: v for r in report["models"].values() for k, v in r.get("skipped", {}).items()}
    lines += [f"\n{k}: {v}" for k, v in skipped.items()]
    return "\n".join(lines) + "\n"


def _grid(source, target, preds: dict, contrast: str, path: Path, num: int = 6) -> None:
    """Columns: examples; rows: source, target, then each prediction and its absolute error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(num, len(source))
    rows = [("source", source), ("target", target)]
    for name, p in preds.items():
        rows += [(name, p), (f"|error| {name}", (p - target).abs() - 1.0)]  # error in model units, from -1
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.6 * len(rows)), dpi=100, squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c, 0].numpy(), cmap="magma" if title.startswith("|error|") else "gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
