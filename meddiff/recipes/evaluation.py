"""``meddiff evaluate``: one report on a checkpoint's quality, diversity and privacy leakage.

Generates class-balanced samples, encodes them and the real held-out images with the chosen
encoder, and writes ``eval.json``, ``eval.md`` and PNGs (sample grid, nearest-neighbour pairs,
precision/recall bars) into the output folder. Real data: the training split (members, for
memorization and membership inference) and the held-out split (the reference distribution and
the non-members). Supported: MedMNIST ``.npz`` files (train / test splits) and the embedded
phantoms (a held-out set from a different seed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from configs import ExperimentConfig
from meddiff.recipes.build import build_diffusion, build_image_dataset
from meddiff.recipes.restore import codec_from_checkpoint, model_from_checkpoint
from meddiff.device import resolve_device
from meddiff.evaluate.audits import diffusion_losses, memorization, membership_inference
from meddiff.evaluate.encoders import build_encoder
from meddiff.evaluate.federated import dataset_images, subset_indices
from meddiff.evaluate.metrics import (
    FeatureStats,
    density_coverage,
    fid_from_stats,
    kernel_inception_distance,
    ms_ssim_diversity,
    precision_recall,
)
from meddiff.evaluate.utility import downstream_utility
from meddiff.latent import encode_dataset
from meddiff.outputs import save_grid_png
from meddiff.recipes.sample import sample_images
from meddiff.recipes.sites import load_manifest, phantom_site, site_dataset


def real_splits(cfg: ExperimentConfig, data_path: Optional[str] = None) -> tuple[Dataset, Dataset]:
    """(training split, held-out split) of the checkpoint's dataset, or of ``data_path``."""
    data = cfg.data if not data_path else dataclasses.replace(cfg.data, path=str(data_path))
    if data.dataset == "medmnist":
        return (build_image_dataset(cfg, dataclasses.replace(data, split="train")),
                build_image_dataset(cfg, dataclasses.replace(data, split="test")))
    if data.dataset == "phantoms":
        return build_image_dataset(cfg, data), build_image_dataset(cfg, dataclasses.replace(data, seed=data.seed + 7919))
    raise ValueError(f"evaluation of data.dataset={data.dataset!r} is not supported yet: use a MedMNIST .npz "
                     "(--data file.npz with a medmnist checkpoint) or the embedded phantoms")


def matched_indices(member_labels: torch.Tensor, nonmember_labels: torch.Tensor, total: int) -> tuple[list[int], list[int]]:
    """Equal numbers of members and non-members *per class*, up to ``total`` each.

    The loss differs between classes, so with different class mixes (PneumoniaMNIST's train split
    is 74% pneumonia, its test split 62%) a loss attack scores the mix, not memorization.
    """
    classes = sorted(set(member_labels.tolist()) & set(nonmember_labels.tolist()))
    per_class = max(1, total // max(len(classes), 1))
    members, nonmembers = [], []
    for c in classes:
        m = (member_labels == c).nonzero().flatten().tolist()
        n = (nonmember_labels == c).nonzero().flatten().tolist()
        k = min(per_class, len(m), len(n))
        members += m[:k]
        nonmembers += n[:k]
    if len(members) < 2:
        raise ValueError("membership inference needs members and non-members of a common class")
    return members, nonmembers


def site_splits(cfg: ExperimentConfig, run_dir: Path) -> dict[str, tuple[Dataset, Dataset]]:
    """``{site: (its training data, its own held-out data)}`` of a federated run, or ``{}``.

    From the run's split ``manifest.json``, or, for the embedded phantoms, from the generated
    sites. A site's held-out records share its acquisition, which makes them the right
    non-members for that site's membership inference."""
    if (run_dir / "manifest.json").is_file():
        manifest = load_manifest(run_dir / "manifest.json")
        return {s["name"]: (site_dataset(manifest, i, cfg, split="train"), site_dataset(manifest, i, cfg, split="test"))
                for i, s in enumerate(manifest["sites"])}
    if cfg.data.dataset == "phantoms" and (run_dir / "summary.json").is_file():
        n = cfg.federation.num_sites
        return {f"site_{i}": (phantom_site(i, n, cfg), phantom_site(i, n, cfg, split="test")) for i in range(n)}
    return {}


def per_site_membership(model, diffusion, cfg: ExperimentConfig, run_dir: Path, *, examples: int, device, seed: int,
                        to_model_space=lambda ds: ds) -> dict:
    """Loss-attack AUC and TPR at 1% FPR per site: its training records against its held-out ones
    (``to_model_space`` maps images to what the model denoises: latents for latent diffusion)."""
    out = {}
    for name, (train, test) in site_splits(cfg, run_dir).items():
        if len(test) < 2:
            continue
        (_, train_y), (_, test_y) = dataset_images(train, 4 * examples), dataset_images(test, 4 * examples)
        try:
            matched = matched_indices(train_y, test_y, examples)
        except ValueError:  # too few records of a shared label to match members with non-members
            continue
        out[name] = loss_attack(model, diffusion, train, test, matched, pool=4 * examples, device=device, seed=seed,
                                to_model_space=to_model_space)
    return out


def loss_attack(model, diffusion, train_ds, test_ds, matched: tuple, *, pool: int, device, seed: int,
                to_model_space=lambda ds: ds) -> dict:
    """Membership inference by the diffusion loss: the ``matched`` positions (label-matched, from
    :func:`matched_indices`) among the first ``pool`` training records (members) and held-out ones."""
    m_pos, n_pos = matched
    m_idx, n_idx = subset_indices(len(train_ds), pool), subset_indices(len(test_ds), pool)
    members = diffusion_losses(model, diffusion, to_model_space(Subset(train_ds, [m_idx[i] for i in m_pos])),
                               device=device, seed=seed)
    nonmembers = diffusion_losses(model, diffusion, to_model_space(Subset(test_ds, [n_idx[i] for i in n_pos])),
                                  device=device, seed=seed)
    return membership_inference(members, nonmembers)


def distribution_metrics(real: np.ndarray, fake: np.ndarray) -> dict:
    p, r = precision_recall(real, fake)
    d, c = density_coverage(real, fake)
    kid, kid_std = kernel_inception_distance(real, fake, subset_size=min(100, len(real), len(fake)))
    return {"fid": fid_from_stats(FeatureStats.of(real), FeatureStats.of(fake)), "kid": kid, "kid_std": kid_std,
            "precision": p, "recall": r, "density": d, "coverage": c}


def _per_class_fid(f_real: np.ndarray, real_y: torch.Tensor, f_gen: np.ndarray, gen_y: torch.Tensor, k: int) -> dict:
    """FID per class label, for the classes with at least two real and two generated images."""
    out = {}
    for c in range(k):
        real_c, gen_c = f_real[(real_y == c).numpy()], f_gen[(gen_y == c).numpy()]
        if len(real_c) >= 2 and len(gen_c) >= 2:
            out[str(c)] = fid_from_stats(FeatureStats.of(real_c), FeatureStats.of(gen_c))
    return out


def _memorization(generated: torch.Tensor, train_x: torch.Tensor, test_x: torch.Tensor, pairs_png: Path) -> dict:
    """Nearest-training-image distances; the eight closest pairs go to ``pairs_png``."""
    mem = memorization(generated, train_x, test_x)
    worst = np.argsort(mem.generated_to_train)[:8]
    pairs = torch.stack([torch.stack([generated[i], train_x[mem.nearest_train_index[i]]]) for i in worst]).flatten(0, 1)
    save_grid_png(pairs, pairs_png, nrow=2, upscale=2)
    return mem.summary()


def evaluate_checkpoint(checkpoint: str | Path, *, out_dir: str | Path, encoder: str = "domain",
                        encoder_weights: Optional[str] = None, data_path: Optional[str] = None, num_samples: int = 256,
                        max_real: int = 1000, mia_examples: int = 256, utility_steps: int = 300, device: str = "auto",
                        seed: int = 0, progress: bool = True) -> dict:
    """Evaluate a checkpoint; returns the report dict (also written as ``eval.json``).

    For latent diffusion, samples are decoded by the checkpoint's autoencoder and the loss-based
    membership attack scores the model on the encoded latents of real images.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    model, cfg, ckpt = model_from_checkpoint(checkpoint, device=dev)
    codec = codec_from_checkpoint(ckpt, cfg, source=str(checkpoint))
    to_model_space = (lambda ds: encode_dataset(codec, ds, device=dev)) if codec is not None else (lambda ds: ds)
    enc = build_encoder(encoder, encoder_weights)
    train_ds, test_ds = real_splits(cfg, data_path)
    train_x, train_y = dataset_images(train_ds, max_real)
    test_x, test_y = dataset_images(test_ds, max_real)

    k = cfg.model.num_classes
    y = torch.arange(num_samples) % k if k else None
    generated = sample_images(model, cfg, num=num_samples, device=dev, seed=seed, y=y, progress=progress, codec=codec).cpu()

    f_real, f_gen = enc.encode(test_x), enc.encode(generated)
    report: dict = {"checkpoint": str(checkpoint), "encoder": enc.description, "num_generated": num_samples,
                    "num_real_heldout": len(test_x), "sampler": f"{cfg.sampler.name}{cfg.sampler.num_inference_steps}",
                    **distribution_metrics(f_real, f_gen), "diversity_ssim_generated": ms_ssim_diversity(generated),
                    "diversity_ssim_real": ms_ssim_diversity(test_x)}
    if k:
        report["per_class_fid"] = _per_class_fid(f_real, test_y, f_gen, y, k)
        report["utility"] = downstream_utility(real_train=(train_x, train_y), synthetic=(generated, y),
                                               real_test=(test_x, test_y), num_classes=k, steps=utility_steps, seed=seed)
    report["memorization"] = _memorization(generated, train_x, test_x, out_dir / "nearest_pairs.png")
    diffusion = build_diffusion(cfg.diffusion)
    report["membership_inference"] = loss_attack(model, diffusion, train_ds, test_ds,
                                                 matched_indices(train_y, test_y, mia_examples), pool=max_real,
                                                 device=dev, seed=seed, to_model_space=to_model_space)
    sites = per_site_membership(model, diffusion, cfg, Path(checkpoint).resolve().parent.parent, examples=mia_examples,
                                device=dev, seed=seed, to_model_space=to_model_space)
    if sites:
        report["membership_inference_per_site"] = sites

    save_grid_png(generated[:64], out_dir / "samples.png", upscale=2)
    _bars(report, out_dir / "precision_recall.png")
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    (out_dir / "eval.md").write_text(_markdown(report))
    return report


def _bars(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["precision", "recall", "density", "coverage"]
    fig, ax = plt.subplots(figsize=(4.5, 3), dpi=120)
    ax.bar(names, [min(report[n], 1.5) for n in names], color=["#4477aa", "#66ccee", "#228833", "#ccbb44"])
    ax.set_ylim(0, 1.05 if max(report[n] for n in names) <= 1 else 1.5)
    ax.set_title(f"FID {report['fid']:.2f} ({report['encoder'].split(' (')[0]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _markdown(r: dict) -> str:
    m, a = r["memorization"], r["membership_inference"]
    lines = ["# Evaluation", "", f"- checkpoint: `{r['checkpoint']}`", f"- encoder: {r['encoder']}",
             f"- {r['num_generated']} generated ({r['sampler']}) vs {r['num_real_heldout']} held-out real images", "",
             "| metric | value |", "| --- | --- |"]
    for key in ("fid", "kid", "precision", "recall", "density", "coverage", "diversity_ssim_generated", "diversity_ssim_real"):
        lines.append(f"| {key} | {r[key]:.4f} |")
    for c, v in r.get("per_class_fid", {}).items():
        lines.append(f"| FID class {c} | {v:.4f} |")
    u = r.get("utility")
    if u:
        lines += [f"| TSTR accuracy (train synthetic, test real) | {u['tstr_accuracy']:.3f} |",
                  f"| TRTR accuracy (train real, test real) | {u['trtr_accuracy']:.3f} |",
                  f"| real + synthetic accuracy | {u['real_plus_synthetic_accuracy']:.3f} |",
                  f"| majority-class accuracy | {u['majority_class_accuracy']:.3f} |"]
    lines += [f"| DCR median generated / held-out | {m['dcr_generated_median']:.3f} / {m['dcr_heldout_median']:.3f} |",
              f"| near-duplicates of training images | {m['near_duplicates']} ({100 * m['near_duplicate_fraction']:.1f}%) |",
              f"| membership inference AUC | {a['mia_auc']:.3f} |", f"| MIA TPR at 1% FPR | {a['mia_tpr_at_1pct_fpr']:.3f} |",
              *[f"| MIA AUC / TPR at 1% FPR, {site} | {v['mia_auc']:.3f} / {v['mia_tpr_at_1pct_fpr']:.3f} |"
                for site, v in r.get("membership_inference_per_site", {}).items()],
              "", "Lower SSIM diversity means more diverse. Near-duplicates: generated images closer to a training image "
              "than 99% of held-out images are. MIA: loss attack over t in {50, 100, 200, 400}; 0.5 means no leakage.",
              "", "Figures: `samples.png`, `nearest_pairs.png` (generated | nearest training image, closest first), "
              "`precision_recall.png`.", ""]
    return "\n".join(lines)
